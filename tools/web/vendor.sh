#!/usr/bin/env bash
# Re-vendor the chat page's and dashboard's browser libraries from npm (run after changing package.json):
#   tools/web/vendor.sh
# npm installs the pinned versions (package-lock.json) into a temporary folder, so node_modules never
# enters the repository; the minified browser builds, their licences and VERSIONS.md are copied into
# src/chatscale/server/static/vendor/. The pages load them from there: no CDN at run time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../src/chatscale/server/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$work/"
(cd "$work" && npm ci --no-audit --no-fund -q)  # exactly the locked versions (npm install to change them)
nm="$work/node_modules"

rm -rf "$out" && mkdir -p "$out/licenses"
# file in node_modules -> name under vendor/ (source-map comments dropped: the maps are not vendored)
copy() { sed '/^\/\/# sourceMappingURL=/d; s|/\*# sourceMappingURL=[^*]*\*/||' "$nm/$1" > "$out/$2"; }
copy markdown-it/dist/browser/markdown-it.umd.min.js markdown-it.min.js
copy @highlightjs/cdn-assets/highlight.min.js highlight.min.js
copy @highlightjs/cdn-assets/styles/github.min.css highlight-github.min.css
copy @highlightjs/cdn-assets/styles/github-dark.min.css highlight-github-dark.min.css
copy dompurify/dist/purify.min.js purify.min.js
copy uplot/dist/uPlot.iife.min.js uPlot.iife.min.js
copy uplot/dist/uPlot.min.css uPlot.min.css

# markdown-it's browser build bundles its dependencies: their licences travel with it.
packages="markdown-it entities linkify-it mdurl punycode.js uc.micro @highlightjs/cdn-assets dompurify uplot"
{
  echo "# Vendored browser libraries"
  echo
  echo "Written by \`tools/web/vendor.sh\` from npm (versions pinned in \`tools/web/package-lock.json\`);"
  echo "licences under \`licenses/\`. Do not edit by hand: change tools/web/package.json and re-run."
  echo
  echo "| package | version | licence | used for |"
  echo "|---|---|---|---|"
  for p in $packages; do
    version=$(node -p "require('$nm/$p/package.json').version")
    licence=$(node -p "require('$nm/$p/package.json').license")
    case $p in
      markdown-it) use="chat page: Markdown to HTML (markdown-it.min.js)" ;;
      entities|linkify-it|mdurl|punycode.js|uc.micro) use="bundled inside markdown-it.min.js" ;;
      @highlightjs/cdn-assets) use="chat page: code highlighting (highlight.min.js, github themes)" ;;
      dompurify) use="chat page: sanitising rendered answers (purify.min.js)" ;;
      uplot) use="dashboard: time-series charts (uPlot.iife.min.js, uPlot.min.css)" ;;
    esac
    echo "| $p | $version | $licence | $use |"
    name=${p//@highlightjs\//highlightjs-}
    cat "$nm/$p"/LICEN[CS]E* > "$out/licenses/$name.txt"
  done
} > "$out/VERSIONS.md"
ls -l "$out"
