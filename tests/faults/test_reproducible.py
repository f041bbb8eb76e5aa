"""The same command twice gives the same tables on CPU, the recorded settings carry seeds,
versions and the git commit, an uncached hub id fails at once when offline and is announced
before its download when online."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from tests.faults.cli import ANALYZE, GENERATE, TABLES, TRAIN, error_line, files_under, losses, ok, run

MADE_UP_HUB_ID = "bganalysis-faults/no-such-model-7b"


def _assert_provenance(record: dict) -> None:
    for key in ("bganalysis", "torch", "transformers", "python"):
        assert record[key], key
    assert record["git_commit"] and len(record["git_commit"].removesuffix("-dirty")) == 40, record


def test_train_twice_same_student(train_reference, tmp_path):
    ok(run(["train", *TRAIN, "--out", str(tmp_path)], tmp_path))
    student = tmp_path / "students" / "hybrid"
    assert losses(student) == losses(train_reference)
    weights, reference = load_file(student / "model.safetensors"), load_file(train_reference / "model.safetensors")
    assert all(weights[name].equal(reference[name]) for name in reference)
    saved = yaml.safe_load((student / "train_config.yaml").read_text())
    assert saved["seed"] == saved["provenance"]["seed"] == 0
    _assert_provenance(saved["provenance"]["versions"])


def test_train_refuses_a_finished_student_with_other_settings(train_reference, tmp_path):
    out = tmp_path / "out"
    (out / "students").mkdir(parents=True)
    (out / "students" / "hybrid").symlink_to(train_reference, target_is_directory=True)
    before = files_under(train_reference)
    message = error_line(run(["train", *TRAIN, "--lr", "0.002", "--out", str(out)], tmp_path), "train")
    assert "lr=0.001 -> 0.002" in message and "--force" in message
    assert files_under(train_reference) == before and not (out / "checkpoints").exists()


def test_generate_twice_same_rows(generate_reference, tmp_path):
    out = tmp_path / "labels.jsonl"
    ok(run(["generate", *GENERATE, "--out", str(out)], tmp_path))
    assert out.read_bytes() == generate_reference.read_bytes()
    meta = json.loads((tmp_path / "labels.jsonl.meta.json").read_text())
    assert meta["settings"]["seed"] == 3
    _assert_provenance(meta["provenance"])


def test_generate_refuses_other_settings(generate_reference, tmp_path):
    out = tmp_path / "labels.jsonl"
    out.write_bytes(generate_reference.read_bytes())
    meta = generate_reference.with_name("labels.jsonl.meta.json")
    (tmp_path / meta.name).write_bytes(meta.read_bytes())
    message = error_line(run(["generate", *GENERATE, "--seed", "4", "--out", str(out)], tmp_path), "generate")
    assert "seed (3 -> 4)" in message and "--force" in message
    assert out.read_bytes() == generate_reference.read_bytes()


@pytest.mark.slow
def test_analyze_twice_same_tables(analyze_reference, inputs, tmp_path):
    ok(run(["analyze", *ANALYZE, "--student", str(inputs["student"]), "--out", str(tmp_path)], tmp_path))
    for table in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "analysis" / f"{table}.parquet"),
                                      pd.read_parquet(analyze_reference / f"{table}.parquet"))
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["settings"]["seed"] == 0
    _assert_provenance(summary["provenance"])


@pytest.mark.parametrize("command, args", [
    ("train", ["--teacher", MADE_UP_HUB_ID, "--data", "{prompts}", "--steps", "1"]),
    ("generate", ["--teacher", MADE_UP_HUB_ID, "--prompts", "{prompts}"]),
    ("analyze", ["--teacher", "lab", "--student", MADE_UP_HUB_ID, "--prompts", "{prompts}"]),
    ("derive-student", [MADE_UP_HUB_ID, "--layers", "1"]),
])
def test_offline_hub_id_fails_at_once(inputs, tmp_path, command, args):
    out = tmp_path / "out"
    args = [arg.replace("{prompts}", str(inputs["prompts"])) for arg in args]
    # Every HTTP(S) request would go through this loopback proxy, so a connection to it is a network attempt.
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        proxy.setblocking(False)
        address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        proxies = {"HTTP_PROXY": address, "HTTPS_PROXY": address, "http_proxy": address, "https_proxy": address,
                   "NO_PROXY": "", "no_proxy": ""}
        result = run([command, *args, "--out", str(out)], tmp_path, timeout=90, env=proxies)
        with pytest.raises(BlockingIOError):
            proxy.accept()
    message = error_line(result, command)
    assert MADE_UP_HUB_ID in message and "HF_HUB_OFFLINE" in message
    assert files_under(out) == []


class _NotFoundHub(BaseHTTPRequestHandler):
    """A stand-in for the hub on loopback: every file is missing (404 is not retried, so the test is quick)."""

    requests: list[str] = []

    def _not_found(self):
        self.requests.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _not_found

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("command, args", [
    ("derive-student", [MADE_UP_HUB_ID, "--layers", "1"]),
    ("generate", ["--teacher", MADE_UP_HUB_ID, "--prompts", "{prompts}"]),
])
def test_online_download_is_announced(inputs, tmp_path, command, args):
    args = [arg.replace("{prompts}", str(inputs["prompts"])) for arg in args]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _NotFoundHub.requests.clear()
    try:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
               "HF_HOME": str(tmp_path / "hf_home"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        result = run([command, *args, "--out", str(tmp_path / "out")], tmp_path, timeout=90, env=env)
    finally:
        server.shutdown()
        server.server_close()
    announcement = re.compile(f"fetching (model|tokenizer) {re.escape(MADE_UP_HUB_ID)} from the Hugging Face Hub")
    assert announcement.search(result.stderr), result.stderr[-3000:]
    assert _NotFoundHub.requests  # the command did contact the hub stand-in
    assert MADE_UP_HUB_ID in error_line(result, command)
