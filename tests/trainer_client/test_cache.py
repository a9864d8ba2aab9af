"""The teacher cache end to end: `collect` from real teacher services, then training from the shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.cli import main as cli_main
from potstill.toy.arithmetic import make_rows, write_jsonl
from potstill.toy.models import build_tiny_model
from teacher_service.config import ServeOptions
from teacher_service.testing import BackgroundTeacher
from trainer_client.cache_source import CacheMiss, TeacherCache
from trainer_client.cache_store import CacheError, Manifest, pack_ids, unpack_ids, write_shard
from trainer_client.collect import CollectOptions, collect
from trainer_client.config import TrainConfig
from trainer_client.trainer import train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-models")
    return {
        "teacher": str(build_tiny_model(root / "teacher", seed=1, initializer_range=0.3)),
        "student": str(build_tiny_model(root / "student", seed=2, hidden_size=48)),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-data")
    return {
        "train": str(write_jsonl(make_rows(40, seed=0), root / "train.jsonl")),
        "other": str(write_jsonl(make_rows(40, seed=5), root / "other.jsonl")),
        "eval": str(write_jsonl(make_rows(12, seed=0, split="eval"), root / "eval.jsonl")),
    }


@pytest.fixture(scope="module")
def replicas(models):
    started = [BackgroundTeacher(ServeOptions(model=models["teacher"], http_port=0, grpc_port=0)).start() for _ in range(2)]
    yield [teacher.grpc_url for teacher in started]
    for teacher in started:
        teacher.stop()


def _config(models, files, replicas, output, **overrides) -> TrainConfig:
    settings = dict(
        student=models["student"], teachers=replicas, data=files["train"], eval_data=files["eval"], output=str(output),
        method="logit-kd", steps=6, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3, save_every=100,
        eval_rows=12, top_k=8, max_new_tokens=4,
    )
    return TrainConfig(**{**settings, **overrides})


def _losses(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def logit_cache(models, data, replicas, tmp_path_factory):
    """A logit-kd cache of the training rows and the held-out references, from two replicas."""
    output = tmp_path_factory.mktemp("logit-cache")
    config = _config(models, data, replicas, output / "unused")
    result = collect(config, CollectOptions(output=output, shard_rows=16), progress=False)
    return output, result


def test_collect_writes_every_row_once_over_both_replicas(logit_cache):
    output, result = logit_cache
    manifest = Manifest.read(output)
    assert [(s.part, s.rows) for s in manifest.shards] == [("train", (0, 16)), ("train", (16, 32)), ("train", (32, 40)), ("eval", (0, 12))]
    assert sum(s.entries["score"] for s in manifest.shards if s.part == "eval") == 12
    assert sum(s.entries["score"] for s in manifest.shards if s.part == "train") == len(TeacherCache(output)) - 12
    assert manifest.settings["top_k"] == 8 and manifest.teachers[0].info.tokenizer_fingerprint
    assert all(traffic["requests"] > 0 for traffic in result.traffic.values()), result.traffic


def test_training_from_the_cache_gives_the_live_losses(models, data, replicas, logit_cache, tmp_path):
    cache, _ = logit_cache
    live = train(_config(models, data, replicas, tmp_path / "live"), progress=False)
    cached = train(_config(models, data, [], tmp_path / "cached", teacher_cache=str(cache)), progress=False)
    live_lines, cached_lines = _losses(live.output), _losses(cached.output)
    assert len(live_lines) == len(cached_lines) == 6 + 3  # a loss line per step, evaluations at 0, 3, 6
    for ours, theirs in zip(cached_lines, live_lines):
        for name in ("loss", "kd", "ce", "eval/kl", "eval/ce"):
            if name in theirs:
                assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), (name, ours, theirs)
    traffic = json.loads((cached.output / "teacher_traffic.json").read_text())
    assert traffic["cache:teacher"]["cache_misses"] == 0 and traffic["cache:teacher"]["cache_hits"] >= 6 * 8


def test_a_live_run_records_what_it_received_and_a_second_run_replays_it(models, data, replicas, tmp_path):
    live = train(_config(models, data, replicas, tmp_path / "live", steps=4, eval_every=2, record_teacher_cache=str(tmp_path / "rec")),
                 progress=False)
    assert [(s.part, s.rows) for s in Manifest.read(tmp_path / "rec").shards] == [("steps", (0, 4))]
    replay = train(_config(models, data, [], tmp_path / "replay", steps=4, eval_every=2, teacher_cache=str(tmp_path / "rec")),
                   progress=False)
    for ours, theirs in zip(_losses(replay.output), _losses(live.output), strict=True):
        assert {k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in ours.items() if "loss" in k or "kl" in k} == \
            {k: v for k, v in theirs.items() if "loss" in k or "kl" in k}
    assert json.loads((replay.output / "teacher_traffic.json").read_text())["cache:teacher"]["cache_misses"] == 0


def test_a_run_asking_other_settings_is_refused_naming_them(models, data, logit_cache, tmp_path):
    cache, _ = logit_cache
    with pytest.raises(CacheError, match=r"top_k: the cache has 8, this run asks 4.*max_seq_len: the cache has 512, this run asks 64"):
        train(_config(models, data, [], tmp_path / "run", teacher_cache=str(cache), top_k=4, max_seq_len=64), progress=False)


def test_a_cache_for_another_tokenizer_or_vocabulary_is_refused(models, data, logit_cache, tmp_path):
    cache, _ = logit_cache
    manifest = Manifest.read(cache)
    other = manifest.model_copy(deep=True)
    other.settings["student_tokenizer"] = "0" * 64
    other.teachers = [t.model_copy(update={"info": t.info.model_copy(update={"tokenizer_fingerprint": "0" * 64})}) for t in other.teachers]
    shutil.copytree(cache, tmp_path / "other-tokenizer")
    other.write(tmp_path / "other-tokenizer")
    with pytest.raises(CacheError, match="student_tokenizer: the cache has '0000.*teacher 'teacher' tokenizer fingerprint 0000"):
        train(_config(models, data, [], tmp_path / "run", teacher_cache=str(tmp_path / "other-tokenizer")), progress=False)
    wide = AutoModelForCausalLM.from_pretrained(models["student"])
    wide.resize_token_embeddings(wide.config.vocab_size + 16)
    wide.save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(models["student"]).save_pretrained(tmp_path / "wide")
    with pytest.raises(CacheError, match=f"teacher 'teacher' vocab_size {wide.config.vocab_size - 16} differs from the student's {wide.config.vocab_size}"):
        train(_config(models, data, [], tmp_path / "run", student=str(tmp_path / "wide"), teacher_cache=str(cache)), progress=False)


def test_rows_missing_from_the_cache_stop_the_run_or_go_live(models, data, replicas, logit_cache, tmp_path):
    cache, _ = logit_cache
    with pytest.raises(CacheMiss, match="no score answer from teacher 'teacher'.*--cache-miss live"):
        train(_config(models, data, [], tmp_path / "miss", data=data["other"], teacher_cache=str(cache)), progress=False)
    run = train(_config(models, data, replicas, tmp_path / "live", data=data["other"], teacher_cache=str(cache), cache_miss="live"),
                progress=False)
    traffic = json.loads((run.output / "teacher_traffic.json").read_text())
    assert traffic["cache:teacher"]["cache_misses"] > 0 and sum(traffic[url]["requests"] for url in replicas) > 0


def test_a_corrupted_shard_is_refused_and_collected_again(models, data, replicas, tmp_path):
    config = _config(models, data, replicas, tmp_path / "unused", eval_data=None)
    collect(config, CollectOptions(output=tmp_path / "cache", shard_rows=16), progress=False)
    manifest = Manifest.read(tmp_path / "cache")
    shard = tmp_path / "cache" / manifest.shards[1].file
    corrupted = bytearray(shard.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    shard.write_bytes(bytes(corrupted))
    with pytest.raises(CacheError, match=f"{shard.name}: corrupted shard"):
        train(_config(models, data, [], tmp_path / "run", eval_data=None, teacher_cache=str(tmp_path / "cache")), progress=False)
    collect(config, CollectOptions(output=tmp_path / "cache", shard_rows=16), progress=False)
    assert Manifest.read(tmp_path / "cache").shards == manifest.shards  # redone, the same answers
    assert len(TeacherCache(tmp_path / "cache")) > 0


def test_an_interrupted_collect_resumes_without_duplicates_or_gaps(models, data, replicas, tmp_path, monkeypatch):
    config = _config(models, data, replicas, tmp_path / "unused", eval_data=None)
    options = CollectOptions(output=tmp_path / "cache", shard_rows=8)
    real_add, written = Manifest.add, []

    def crash_after_the_third_shard_file(manifest, directory, file, part, rows, entries):
        written.append(file)
        if len(written) == 3:
            write_shard(directory, file, entries, manifest.storage)
            raise KeyboardInterrupt  # the shard file is in place, the manifest does not list it yet
        return real_add(manifest, directory, file, part, rows, entries)

    monkeypatch.setattr(Manifest, "add", crash_after_the_third_shard_file)
    with pytest.raises(KeyboardInterrupt):
        collect(config, options, progress=False)
    assert [s.rows for s in Manifest.read(options.output).shards] == [(0, 8), (8, 16)]
    assert (options.output / written[2]).is_file()
    monkeypatch.setattr(Manifest, "add", real_add)
    collect(config, options, progress=False)
    resumed = Manifest.read(options.output)
    assert [s.rows for s in resumed.shards] == [(start, start + 8) for start in range(0, 40, 8)]
    # The same shards, byte for byte in content, as one uninterrupted collect.
    clean = collect(config, CollectOptions(output=tmp_path / "clean", shard_rows=8), progress=False).manifest
    assert [(s.rows, s.entries, s.positions) for s in resumed.shards] == [(s.rows, s.entries, s.positions) for s in clean.shards]
    assert len(TeacherCache(options.output)) == len(TeacherCache(tmp_path / "clean"))


def test_a_collect_into_a_cache_made_differently_is_refused(models, data, replicas, logit_cache, capsys):
    cache, _ = logit_cache
    config = _config(models, data, replicas, cache / "unused", top_k=4)
    with pytest.raises(CacheError, match="made differently.*settings"):
        collect(config, CollectOptions(output=cache, shard_rows=16), progress=False)
    # On the command line: one line naming the difference, exit status 2.
    with pytest.raises(SystemExit) as exit_status:
        cli_main(["collect", "--student", models["student"], "--data", data["train"], "--eval-data", data["eval"], "--teacher",
                  replicas[0], "--top-k", "4", "--output", str(cache), "--shard-rows", "16"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("potstill collect: error: ") and "made differently" in error and "\n" not in error


def test_seq_kd_samples_come_from_the_cache(models, data, replicas, tmp_path):
    config = _config(models, data, replicas, tmp_path / "unused", method="seq-kd", samples_per_prompt=2, eval_data=None)
    manifest = collect(config, CollectOptions(output=tmp_path / "cache", shard_rows=16, fp16=True, pack_ids=True), progress=False).manifest
    assert sum(s.entries["generate"] for s in manifest.shards) == 2 * 40 - 2 * _repeats(data["train"])
    assert manifest.storage.values == "float16" and manifest.storage.id_bits < 16
    run = train(_config(models, data, [], tmp_path / "run", method="seq-kd", samples_per_prompt=2, eval_data=None,
                        teacher_cache=str(tmp_path / "cache")), progress=False)
    assert json.loads((run.output / "teacher_traffic.json").read_text())["cache:teacher"]["cache_misses"] == 0
    with pytest.raises(CacheError, match="samples_per_prompt: the cache has 2, this run asks 3"):
        train(_config(models, data, [], tmp_path / "run3", method="seq-kd", samples_per_prompt=3, eval_data=None,
                      teacher_cache=str(tmp_path / "cache")), progress=False)


def _repeats(path: str) -> int:
    prompts = [json.loads(line)["prompt"] for line in open(path)]
    return len(prompts) - len(set(prompts))


@pytest.mark.parametrize("bits", [1, 7, 17, 32])
def test_packed_ids_round_trip(bits):
    ids = np.random.default_rng(bits).integers(0, min(2**bits, 2**31), size=(5, 3), dtype=np.int64)
    packed = pack_ids(ids, bits)
    assert len(packed) == -(-15 * bits // 8)
    assert np.array_equal(unpack_ids(packed, bits, 15).reshape(5, 3), ids)


def test_the_commands_collect_a_streamed_parquet_file_and_train_from_it_streamed(models, replicas, tmp_path, capsys):
    records = [{"question": row["prompt"], "response": row["completion"]} for row in make_rows(24, seed=7)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rows.parquet")
    shared = ["--student", models["student"], "--data", str(tmp_path / "rows.parquet"), "--prompt-column", "question",
              "--completion-column", "response", "--top-k", "5", "--batch-size", "4", "--data-streaming"]
    cli_main(["collect", *shared, "--teacher", replicas[0], "--output", str(tmp_path / "cache"), "--shard-rows", "10"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["entries"] == len({r["question"] for r in records})
    assert [s.rows for s in Manifest.read(tmp_path / "cache").shards] == [(0, 10), (10, 20), (20, 24)]
    cli_main(["train", *shared, "--teacher-cache", str(tmp_path / "cache"), "--output", str(tmp_path / "run"), "--steps", "3",
              "--log-every", "1"])
    traffic = json.loads((tmp_path / "run" / "teacher_traffic.json").read_text())
    assert traffic["cache:teacher"] == {"group": "teacher", "cache_hits": 12, "cache_misses": 0}
