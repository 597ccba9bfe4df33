"""Cache management: `dermpipe cache info` and `prune` on caches made by StageCache, safe beside a running reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dermpipe.engine import cache as cache_module
from dermpipe.engine import cache_admin
from dermpipe.engine.cache import TOUCH_AFTER_S, StageCache, stage_key
from dermpipe.engine.cache_admin import cache_info, prune, remove_entry
from dermpipe.engine.cache_command import main

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0
VERSIONS = {"torch": "x"}


def key(stage: str, i: int) -> str:
    return stage_key(stage, inputs=f"image-{i}", versions=VERSIONS)


def arrays(i: int, n: int = 100) -> dict[str, np.ndarray]:
    return {"x": np.full(n, i, dtype=np.uint8)}


def fill(cache: Path, stage: str, count: int, n: int = 100) -> list[Path]:
    """``count`` real entries of ``stage``, entry i holding ``n`` bytes of value i."""
    store = StageCache(cache, stage)
    return [store.put(key(stage, i), arrays(i, n), {"i": i}) for i in range(count)]


def age(path: Path, days: float, now: float | None = None) -> None:
    t = (time.time() if now is None else now) - days * DAY
    os.utime(path, (t, t))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.npz") if not p.name.startswith("."))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: "), captured
    return lines[0]


@pytest.fixture
def cache(tmp_path) -> Path:
    """Two stages: 4 crops of 1000 bytes, 3 probabilities of 100 bytes."""
    root = tmp_path / "runs" / "cache"
    fill(root, "crops", 4, n=1000)
    fill(root, "crop_probabilities", 3)
    return root


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- info


def test_info_counts_entries_bytes_and_last_use(cache, capsys):
    now = time.time()
    crops = entries(cache / "crops")
    for days, path in zip([10, 5, 1, 0], crops):
        age(path, days, now)
    StageCache(cache, "crop_probabilities").get(key("crop_probabilities", 0))  # a hit: nothing to refresh yet

    usage = {u.stage: u for u in cache_info(cache)}
    assert list(usage) == ["crop_probabilities", "crops"]
    assert usage["crops"].entries == 4 and usage["crop_probabilities"].entries == 3
    assert usage["crops"].bytes == sum(p.stat().st_size for p in crops)
    assert usage["crops"].oldest == pytest.approx(now - 10 * DAY, abs=1)
    assert usage["crops"].newest == pytest.approx(now, abs=1)
    assert usage["crops"].temporaries == 0

    assert main(["info", "--cache", str(cache), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_stage = {s["stage"]: s for s in out["stages"]}
    assert by_stage["crops"]["bytes"] == usage["crops"].bytes and by_stage["crops"]["oldest"].endswith("Z")
    assert out["total"]["entries"] == 7
    assert out["total"]["bytes"] == sum(p.stat().st_size for p in entries(cache))

    assert main(["info", "--root", str(cache.parent)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"cache {cache} ")
    assert [line.split()[0] for line in table[2:]] == ["crop_probabilities", "crops", "total"]
    assert table[-1].split()[1] == "7"


def test_a_hit_marks_the_entry_used_at_most_hourly(tmp_path):
    store = StageCache(tmp_path, "crops")
    old, recent = store.put(key("crops", 0), arrays(0)), store.put(key("crops", 1), arrays(1))
    age(old, 40)
    age(recent, (TOUCH_AFTER_S / 2) / DAY)
    before = recent.stat().st_mtime_ns
    assert store.get(key("crops", 0)) is not None and store.get(key("crops", 1)) is not None
    assert time.time() - old.stat().st_mtime < 60  # used now: --older-than counts from here
    assert recent.stat().st_mtime_ns == before  # touched less than an hour ago: no write


def test_a_read_only_entry_is_still_a_hit(tmp_path, monkeypatch):
    store = StageCache(tmp_path, "crops")
    age(store.put(key("crops", 0), arrays(0)), 40)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(cache_module.os, "utime", read_only)
    assert store.get(key("crops", 0))[0]["x"].tolist() == arrays(0)["x"].tolist()


def test_an_empty_cache_is_a_total_of_zero(tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    assert main(["info", "--cache", str(tmp_path / "cache"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"] == [] and out["total"]["entries"] == 0 and out["total"]["oldest"] is None


# ---- prune


def test_prune_by_stage_removes_that_stage_only(cache, capsys):
    kept = files(cache / "crop_probabilities")
    assert main(["prune", "--cache", str(cache), "--stage", "crops"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 4 entries")
    assert entries(cache / "crops") == [] and (cache / "crops").is_dir()  # folders stay for writers
    assert files(cache / "crop_probabilities") == kept
    assert not [p for p in cache.rglob(".*")]  # no trash left


def test_prune_by_age_removes_unused_entries_and_a_run_recomputes_them(cache, capsys):
    now = time.time()
    for i, path in enumerate(entries(cache / "crops")):
        age(path, 40 if i < 2 else 3, now)
    for path in entries(cache / "crop_probabilities"):
        age(path, 31, now)
    before = set(entries(cache))
    gone = {p for p in before if p.stat().st_mtime < now - 30 * DAY}
    assert main(["prune", "--cache", str(cache), "--older-than", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"]["total"]["entries"] == 5 and out["kept"]["total"]["entries"] == 2
    assert len(gone) == 5 and set(entries(cache)) == before - gone

    store = StageCache(cache, "crop_probabilities")
    calls = []
    result, meta = store.get_or_compute(key("crop_probabilities", 1), lambda: (calls.append(1), arrays(1))[1])
    assert calls == [1] and result["x"].tolist() == arrays(1)["x"].tolist() and store.corrupt == 0


def test_prune_to_a_size_removes_the_least_recently_used_first(cache, capsys):
    now = time.time()
    paths = entries(cache)
    order = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    for rank, path in enumerate(order):  # order[0] is the least recently used
        age(path, 100 - rank, now)
    total = sum(p.stat().st_size for p in paths)
    limit = total - order[0].stat().st_size - order[1].stat().st_size + 1  # two must go, a third need not
    assert main(["prune", "--cache", str(cache), "--max-size", f"{limit / 1e9:.12f}"]) == 0
    assert [p.exists() for p in order] == [False, False] + [True] * (len(order) - 2)
    assert sum(p.stat().st_size for p in entries(cache)) <= limit
    assert "kept 5 entries" in capsys.readouterr().out


def test_prune_to_a_size_with_equal_last_use_removes_just_enough(tmp_path):
    paths = fill(tmp_path, "crops", 6)
    for path in paths:
        age(path, 2, now=1_700_000_000)  # all used at the same instant
    size = paths[0].stat().st_size
    result = prune(tmp_path, max_bytes=4 * size)
    assert result.total(result.removed).entries == 2 and sum(p.exists() for p in paths) == 4
    again = prune(tmp_path, max_bytes=0)
    assert again.total(again.removed).entries == 4 and not any(p.exists() for p in paths)


def test_criteria_combine(cache):
    now = time.time()
    crops = entries(cache / "crops")
    for days, path in zip([50, 40, 20, 10], crops):
        age(path, days, now)
    for path in entries(cache / "crop_probabilities"):
        age(path, 60, now)  # old, but not in the stage pruned
    size = crops[0].stat().st_size
    result = prune(cache, stages=["crops"], older_than_days=30, max_bytes=size, now=now)
    assert [p.exists() for p in crops] == [False, False, False, True]  # two by age, then the older of the rest
    assert result.total(result.kept).entries == 1 and len(entries(cache / "crop_probabilities")) == 3


def test_dry_run_removes_nothing_and_lists_what_would_go(cache, capsys):
    now = time.time()
    old = entries(cache / "crops")[:2]
    for path in old:
        age(path, 40, now)
    before = files(cache)
    argv = ["prune", "--cache", str(cache), "--older-than", "30", "--max-size", "0.000002", "--dry-run"]
    assert main(argv) == 0
    assert files(cache) == before
    out = capsys.readouterr().out
    listed = [line.split()[2] for line in out.splitlines() if line.startswith("would remove  ")]
    assert set(map(str, old)) <= set(listed) and len(listed) == len(set(listed))  # each once, by age or by size
    would = sum(Path(p).stat().st_size for p in listed)
    assert sum(p.stat().st_size for p in entries(cache)) - would <= 2000
    assert f"would remove {len(listed)} entries" in out and "(dry run: nothing removed)" in out

    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and sorted(f["path"] for f in report["files"]) == sorted(listed)
    assert report["removed"]["total"]["bytes"] == would
    assert files(cache) == before


def test_stale_temporaries_are_swept_and_live_ones_kept(cache, capsys):
    folder = next((cache / "crops").iterdir())
    now = time.time()
    dead = dead_pid()
    killed = folder / f".{'a' * 64}.npz.{dead}.tmp.npz"  # a writer killed an hour ago
    fresh = folder / f".{'b' * 64}.npz.{dead}.tmp.npz"  # maybe another machine's writer, still going
    live = folder / f".{'c' * 64}.npz.{os.getpid()}.tmp.npz"  # this process, writing
    abandoned = folder / f".{'d' * 64}.npz.{os.getpid()}.tmp.trash"  # a day old: the pid is someone else's now
    other = folder / ".DS_Store"
    for path, days in [(killed, 1 / 24), (fresh, 0), (live, 0), (abandoned, 2), (other, 100)]:
        path.write_bytes(b"PK half")
        age(path, days, now)

    usage = {u.stage: u for u in cache_info(cache)}
    assert usage["crops"].temporaries == 4 and usage["crops"].entries == 4  # .DS_Store is neither

    assert main(["prune", "--cache", str(cache), "--list"]) == 0  # no criterion: only stale temporaries
    out = capsys.readouterr().out
    assert "removed 0 entries (0 B) and 2 stale temporaries" in out and f"removed  {killed}  " in out
    assert not killed.exists() and not abandoned.exists()
    assert fresh.exists() and live.exists() and other.exists()
    assert len(entries(cache)) == 7


# ---- a reader beside a prune: the whole entry or a miss, never part of one


def test_a_reader_between_rename_and_delete_misses_and_recomputes(cache, monkeypatch):
    store = StageCache(cache, "crops")
    k = key("crops", 2)
    seen = []

    def read_in_between(trash):
        assert trash.exists() and not store.path(k).exists()
        seen.append(store.get(k))  # the name is gone: a miss, not an error
        calls = []
        result, _ = store.get_or_compute(k, lambda: (calls.append(1), arrays(2, 1000))[1])
        seen.append((calls, result["x"].tolist()))
        trash.unlink()

    monkeypatch.setattr(cache_admin, "_discard", read_in_between)
    assert remove_entry(store.path(k))
    assert seen[0] is None and seen[1] == ([1], arrays(2, 1000)["x"].tolist())
    assert store.corrupt == 0 and store.get(k)[0]["x"].tolist() == arrays(2, 1000)["x"].tolist()  # recomputed entry


def test_a_reader_that_opened_the_entry_reads_it_whole_after_the_prune(cache, monkeypatch):
    store = StageCache(cache, "crops")
    k = key("crops", 3)
    real_load = np.load

    def prune_after_open(path, *args, **kwargs):
        npz = real_load(path, *args, **kwargs)
        prune(cache, stages=["crops"])  # every crop, this one included, renamed away and deleted
        assert not Path(path).exists()
        return npz

    monkeypatch.setattr(cache_module.np, "load", prune_after_open)
    hit = store.get(k)
    monkeypatch.undo()
    if os.name == "nt":  # pragma: no cover  (Windows refuses to rename an open file: the prune skips it)
        return
    assert hit is not None and hit[0]["x"].tolist() == arrays(3, 1000)["x"].tolist() and hit[1] == {"i": 3}
    assert store.corrupt == 0 and store.get(k) is None  # gone for the next reader


def test_an_entry_pruned_between_the_check_and_the_open_is_a_miss_not_a_corrupt_entry(cache, monkeypatch, caplog):
    store = StageCache(cache, "crops")
    k = key("crops", 1)
    real_load = np.load

    def pruned_first(path, *args, **kwargs):
        remove_entry(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(cache_module.np, "load", pruned_first)
    assert store.get(k) is None
    monkeypatch.undo()
    assert store.corrupt == 0 and "corrupt" not in caplog.text
    result, meta = store.get_or_compute(k, lambda: (arrays(1, 1000), {"i": 1}))
    assert store.computed == 1 and meta == {"i": 1} and store.get(k) is not None


def test_readers_and_writers_beside_repeated_prunes_never_see_part_of_an_entry(tmp_path):
    """Two runs read, recompute and rewrite their entries while prunes remove them again and again."""
    stage, count = "crops", 20
    fill(tmp_path, stage, count, n=20_000)
    errors: list[Exception] = []
    stop = threading.Event()
    stores = []

    def run(keys: range) -> None:  # threads of one process share a pid, hence its temporary names: their own keys
        store = StageCache(tmp_path, stage)
        stores.append(store)
        try:
            while not stop.is_set():
                for i in keys:
                    result, meta = store.get_or_compute(key(stage, i), lambda i=i: (arrays(i, 20_000), {"i": i}))
                    assert meta == {"i": i} and result["x"].shape == (20_000,) and (result["x"] == i).all()
        except Exception as e:  # failed asserts included: reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(range(j, count, 2),)) for j in range(2)]
    for t in threads:
        t.start()
    try:
        removed = 0
        for _ in range(30):
            result = prune(tmp_path, stages=[stage])
            removed += result.total(result.removed).entries
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert removed > 0 and all(s.computed > 0 and s.reused > 0 and s.corrupt == 0 for s in stores)
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # every trash file deleted


# ---- user mistakes: one line, exit status 2


def test_unknown_stage_names_the_stages_present(cache, capsys):
    assert main(["prune", "--cache", str(cache), "--stage", "crop", "--dry-run"]) == 2
    line = one_error_line(capsys)
    assert "no stage 'crop'" in line and "did you mean 'crops'" in line
    assert "stages present: crop_probabilities, crops" in line
    assert main(["prune", "--cache", str(cache), "--stage", "segmentation"]) == 2
    assert "did you mean" not in one_error_line(capsys)
    assert len(entries(cache)) == 7


@pytest.mark.parametrize("command", [["info"], ["prune", "--older-than", "30"]])
def test_missing_cache_folder_is_one_error_line(tmp_path, monkeypatch, capsys, command):
    missing = tmp_path / "nowhere" / "cache"
    assert main([*command, "--cache", str(missing)]) == 2
    line = one_error_line(capsys)
    assert str(missing) in line and "--cache" in line

    assert main([*command, "--root", str(tmp_path / "exp")]) == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "exp" / "cache") in line and f"--root {tmp_path / 'exp'}" in line

    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    line = one_error_line(capsys)
    assert os.path.join("runs", "cache") in line and "--root runs, the default" in line
    assert not (tmp_path / "runs").exists()  # nothing made


def test_a_file_given_as_the_cache_is_one_error_line(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    assert main(["info", "--cache", str(tmp_path / "cache")]) == 2
    assert "is a file, not a folder (--cache)" in one_error_line(capsys)


@pytest.mark.parametrize("flag", ["--older-than", "--max-size"])
def test_negative_or_non_numeric_amounts_are_refused(cache, capsys, flag):
    for value in ("-1", "soon", "nan"):
        with pytest.raises(SystemExit) as exit_:
            main(["prune", "--cache", str(cache), flag, value])
        assert exit_.value.code == 2
        assert flag in capsys.readouterr().err
    assert len(entries(cache)) == 7


def test_script_runs_from_another_folder(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "engine" / "cache_command.py"), "prune", "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--older-than" in result.stdout and "--dry-run" in result.stdout
