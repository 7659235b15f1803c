// Reading an OpenAI chat-completion stream (SSE) into one answer.

// Events are separated by a blank line; payloads follow "data:"; "[DONE]" ends the stream.
export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// Folds one chunk into `answer` (a message: content, tool_calls as OpenAI's message has them, usage,
// finish). Tool calls stream as deltas keyed by `index`: the id and function name first, then the
// arguments in fragments. Returns whether anything visible changed.
export function applyChunk(answer, chunk) {
  if (chunk.usage) answer.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return false;
  if (choice.finish_reason) answer.finish = choice.finish_reason;
  const delta = choice.delta || {};
  if (delta.content) answer.content += delta.content;
  for (const part of delta.tool_calls || []) {
    answer.tool_calls = answer.tool_calls || [];
    const index = part.index ?? answer.tool_calls.length;
    const call = answer.tool_calls[index] ||
      (answer.tool_calls[index] = { id: "", type: "function", function: { name: "", arguments: "" } });
    if (part.id) call.id = part.id;
    if (part.function && part.function.name) call.function.name += part.function.name;
    if (part.function && part.function.arguments) call.function.arguments += part.function.arguments;
  }
  return Boolean(delta.content || (delta.tool_calls && delta.tool_calls.length));
}

// The answer's footer: tokens, time to first token, decode speed, and the prompt tokens the server's
// prefix cache served (usage.prompt_tokens_details.cached_tokens) when there were any.
export function footer(answer, timing) {
  const usage = answer.usage;
  const tokens = usage ? usage.completion_tokens : timing.chunks;
  const parts = [`${tokens} tokens`];
  if (timing.first !== null) {
    parts.push(`first token ${((timing.first - timing.start) / 1000).toFixed(2)} s`);
    const seconds = (timing.end - timing.first) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tok/s`);
  }
  const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  if (cached) parts.push(`${cached} of ${usage.prompt_tokens} prompt tokens cached`);
  return parts.join(" \u00b7 ");
}
