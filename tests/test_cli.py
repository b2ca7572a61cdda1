"""The `jaxsys` command line, run as a user runs it (fresh processes, no XLA_FLAGS set)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxsys(*args, check=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "jaxsys.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"jaxsys {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 4 steps on cpu8 by the CLI, then resumed to 6."""
    ckpt = tmp_path_factory.mktemp("cli") / "ckpt"
    common = ["train", "--model", "tiny", "--mesh", "cpu8", "--batch-size", 8, "--seq-len", 32,
              "--ckpt-dir", ckpt, "--ckpt-every", 2, "--json"]
    first = json.loads(jaxsys(*common, "--steps", 4).stdout.strip().splitlines()[-1])
    second = json.loads(jaxsys(*common, "--steps", 6, "--resume").stdout.strip().splitlines()[-1])
    return ckpt, first, second


def test_train_and_resume_from_the_cli(trained):
    ckpt, first, second = trained
    assert (first["start_step"], first["end_step"]) == (0, 4)
    assert (second["start_step"], second["end_step"]) == (4, 6)
    assert np.isfinite([first["first_loss"], first["last_loss"], second["last_loss"]]).all()
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2", "4", "6"]
    assert (ckpt / "loss.png").exists() and len((ckpt / "metrics.jsonl").read_text().splitlines()) == 6


def test_generate_json_is_one_line_and_matches_the_library(trained):
    ckpt, _, _ = trained
    proc = jaxsys("generate", "--model", ckpt, "--prompt-ids", "257,81,117", "--max-new-tokens", 6,
                  "--ignore-eos", "--json")
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert len(out["token_ids"]) == 6 and out["decode_tok_per_s"] > 0

    from jaxsys.generate import Generator
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef
    loaded = load_model(str(ckpt))
    expected = Generator(ModelDef(loaded.config), loaded.params, max_len=16).generate(
        [257, 81, 117], max_new_tokens=6, ignore_eos=True).token_ids
    assert out["token_ids"] == expected  # prompt ids verbatim: no BOS added


def test_speculative_generate_from_the_cli_equals_plain_greedy(trained, tmp_path):
    """TriForce with the trained checkpoint as target and its Hugging Face export as draft."""
    ckpt, _, _ = trained
    hf = tmp_path / "hf"
    jaxsys("export", "--model", ckpt, "--out", hf)
    prompt = ",".join(str(t) for t in np.random.default_rng(0).integers(0, 259, 40))
    common = ["generate", "--model", ckpt, "--prompt-ids", prompt, "--max-new-tokens", 12, "--ignore-eos", "--json"]
    plain = json.loads(jaxsys(*common).stdout)
    spec = json.loads(jaxsys(*common, "--speculative", "triforce", "--draft", hf, "--gamma", "2,4",
                             "--retrieval-budget", 16, "--chunk-size", 4, "--draft-window", 8).stdout)
    assert spec["token_ids"] == plain["token_ids"]
    levels = spec["speculative"]["levels"]
    assert set(levels) == {"target", "retrieval"} and levels["retrieval"]["acceptance_rate"] > 0
    assert 0 < spec["speculative"]["target_forwards_per_token"] <= 1
    bad = jaxsys(*common, "--speculative", "draft", "--gamma", "0", "--draft", hf, check=False)
    assert bad.returncode != 0 and "gamma must be >= 1" in bad.stderr
    missing = jaxsys(*common, "--speculative", "draft", check=False)
    assert missing.returncode != 0 and "needs --draft" in missing.stderr


def test_generate_with_quantized_and_offloaded_kv_pages(trained):
    """Host-offloaded float pages give the dense cache's tokens; int8 pages report their bytes."""
    ckpt, _, _ = trained
    common = ["generate", "--model", ckpt, "--prompt-ids", ",".join(["257"] + ["81"] * 40), "--max-new-tokens", 8,
              "--ignore-eos", "--json"]
    dense = json.loads(jaxsys(*common).stdout)
    host = json.loads(jaxsys(*common, "--kv-bits", 16, "--kv-offload", "host", "--device-kv-budget", "20KiB").stdout)
    assert host["token_ids"] == dense["token_ids"]
    assert host["kv"]["device_bytes"] <= 20 * 1024 and host["kv"]["transfer_bytes"]["device_to_host"] > 0
    int8 = json.loads(jaxsys(*common, "--kv-bits", 8).stdout)
    assert len(int8["token_ids"]) == 8 and int8["kv"]["transfer_bytes"]["host_to_device"] == 0
    bad = jaxsys(*common, "--kv-offload", "disk", check=False)
    assert bad.returncode != 0 and "--device-kv-budget" in bad.stderr


def test_generate_text_prompt_with_byte_tokenizer(trained):
    ckpt, _, _ = trained
    out = json.loads(jaxsys("generate", "--model", ckpt, "--prompt", "Question:", "--max-new-tokens", 4,
                            "--temperature", 0.8, "--top-p", 0.9, "--seed", 3, "--json").stdout)
    assert 1 <= len(out["token_ids"]) <= 4 and isinstance(out["text"], str)


def test_generate_past_max_seq_len_runs_with_a_warning(trained):
    ckpt, _, _ = trained
    from jaxsys.loading import load_model
    limit = load_model(str(ckpt)).config.max_seq_len
    proc = jaxsys("generate", "--model", ckpt, "--prompt", "a" * limit, "--max-new-tokens", 2, "--json")
    assert len(json.loads(proc.stdout)["token_ids"]) >= 1
    assert f"past the model's max_seq_len {limit}" in proc.stderr
    short = jaxsys("generate", "--model", ckpt, "--prompt", "a", "--max-new-tokens", 2, "--json")
    assert "max_seq_len" not in short.stderr


def test_text_prompt_without_tokenizer_is_refused(tmp_path):
    from jaxsys.config import get_preset
    from jaxsys.hf import export_hf
    from jaxsys.model import ModelDef
    config = dataclasses.replace(get_preset("tiny"), tokenizer=None)
    export_hf(tmp_path / "hf", config, ModelDef(config).init(0))
    proc = jaxsys("generate", "--model", tmp_path / "hf", "--prompt", "hello", check=False)
    assert proc.returncode == 1 and "has no tokenizer" in proc.stderr and "--prompt-ids" in proc.stderr
    ok = json.loads(jaxsys("generate", "--model", tmp_path / "hf", "--prompt-ids", "1,2", "--max-new-tokens", 3,
                           "--ignore-eos", "--json").stdout)
    assert len(ok["token_ids"]) == 3


def test_bad_input_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = jaxsys("train", "--model", "tiny", "--data", empty, "--steps", 1, "--ckpt-dir", tmp_path / "c",
                  check=False)
    assert proc.returncode == 1 and "empty" in proc.stderr
    assert not (tmp_path / "c").exists() or not any(p.name.isdigit() for p in (tmp_path / "c").iterdir())
    proc = jaxsys("generate", "--model", tmp_path / "missing", "--prompt-ids", "1", check=False)
    assert proc.returncode == 1 and "neither a preset nor an existing path" in proc.stderr
    proc = jaxsys("train", "--mesh", "no-such-preset", check=False)
    assert proc.returncode == 1 and "cpu8" in proc.stderr  # lists the presets


def test_mesh_show_and_help():
    out = jaxsys("mesh", "show", "cpu8").stdout
    for word in ("gcd", "gpu", "node", "8"):
        assert word in out
    assert "384" in jaxsys("mesh", "show", "frontier").stdout
    for command in (["train"], ["generate"], ["mesh", "show"]):
        assert "usage" in jaxsys(*command, "--help").stdout


def test_quantize_then_generate(trained, tmp_path):
    ckpt, _, _ = trained
    out = tmp_path / "w4a16"
    jaxsys("quantize", "--model", ckpt, "--format", "w4a16", "--out", out)
    quantized = json.loads(jaxsys("generate", "--model", out, "--prompt-ids", "257,81", "--max-new-tokens", 4,
                                  "--ignore-eos", "--json").stdout)
    on_load = json.loads(jaxsys("generate", "--model", ckpt, "--weights", "w4a16", "--prompt-ids", "257,81",
                                "--max-new-tokens", 4, "--ignore-eos", "--json").stdout)
    assert len(quantized["token_ids"]) == 4 and len(on_load["token_ids"]) == 4
    proc = jaxsys("train", "--model", out, "--steps", 1, check=False)
    assert proc.returncode == 1 and "quantized checkpoint" in proc.stderr
