"""`chatscale plan` as an operator uses it: a table, JSON for machines, a batch sweep with a plot."""

from __future__ import annotations

import json

import pytest

from chatscale.cli import main


def test_plan_table(capsys):
    assert main(["plan", "--model", "gpt4-moe", "--hardware", "h100", "--gpus", "128",
                 "--batch", "512", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "128 GPUs = tp 8 x pp 16" in out
    assert "memory bound" in out and "fits" in out
    assert "cost per 1k tokens" in out and "experts read per micro-batch" in out


def test_plan_json_agrees_with_the_layout_flags(capsys):
    assert main(["plan", "--model", "llama-3-70b", "--hardware", "h200", "--tp", "2",
                 "--batch", "32", "--context", "4096", "--dtype", "fp8", "--price", "4",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"] == {"tp": 2, "pp": 1, "weight_dtype": "fp8", "kv_dtype": "bf16"}
    assert plan["fits"] and plan["batch"] == 32
    per_gpu_hour = 4 * 2 / 3600 / plan["expected"]["tokens_per_s"] * 1000
    assert plan["expected"]["cost_per_1k_tokens"] == pytest.approx(per_gpu_hour)


def test_plan_sweep_plots_batch(tmp_path, capsys):
    out = tmp_path / "sweep.png"
    assert main(["plan", "--model", "llama-3-8b", "--hardware", "a100-40gb", "--context", "2048",
                 "--sweep", "batch", "--out", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    batches = [r["batch"] for r in rows]
    assert batches[:3] == [1, 2, 4] and batches[-1] == rows[0]["max_batch"]
    throughput = [r["expected"]["tokens_per_s_per_gpu"] for r in rows]
    assert throughput == sorted(throughput)
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plan_reads_a_hf_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
         "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
         "tie_word_embeddings": True}))
    assert main(["plan", "--model", str(tmp_path), "--hardware", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == tmp_path.name


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5", "--hardware", "h100"], "unknown model"),
    (["--model", "gpt4-moe", "--hardware", "tpu"], "unknown hardware"),
    (["--model", "gpt4-moe", "--hardware", "h100", "--gpus", "12", "--tp", "8"], "is not --tp"),
    (["--model", "dense-1t", "--hardware", "h100", "--gpus", "8", "--sweep", "batch"],
     "does not fit"),
    (["--model", "llama-3-8b", "--hardware", "h100", "--batch", "0"], "batch"),
])
def test_plan_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().out


def test_plan_prints_both_speeds_with_mfu_and_takes_the_efficiency_flags(capsys):
    args = ["plan", "--model", "llama-3-8b", "--hardware", "h100", "--batch", "64", "--context", "2048"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "expected at 60% of peak + 2 ms/step" in table and "MFU / MBU" in table
    assert main([*args, "--efficiency", "0.5", "--step-overhead", "0.001", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["efficiency"] == {"fraction": 0.5, "step_overhead_s": 0.001}
    assert p["expected"]["step_s"] == pytest.approx(0.001 + p["roofline"]["step_s"] / 0.5)
    assert 0 < p["expected"]["mfu"] < p["roofline"]["mfu"] and 0 < p["expected"]["mbu"] < p["roofline"]["mbu"] <= 1


def test_plan_accepts_context_zero(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--hardware", "h100", "--batch", "8", "--context", "0"]) == 0
    assert "no limit (no KV cache)" in capsys.readouterr().out
