"""Checkpoints: safetensors round trip with equal outputs, metadata checks, refusal of foreign or unsafe files."""

import pickle

import pytest
import torch

from dermpipe.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_resume_state,
    load_weights,
    read_metadata,
    save_checkpoint,
    save_resume_state,
)

META = {
    "stage": "classification",
    "backbone": "test_resnet",
    "classes": ["nv", "mel"],
    "input_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "config_hash": "abc",
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )


def test_round_trip_gives_equal_outputs(tmp_path):
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    model.eval()
    path = save_checkpoint(tmp_path / "best.safetensors", model, META)
    state, meta = load_checkpoint(path, expect={"stage": "classification", "classes": ("nv", "mel")})
    assert meta["classes"] == ["nv", "mel"] and meta["input_size"] == 64 and "torch" in meta["versions"]
    other = _model()
    other(x)
    torch.nn.init.zeros_(other[0].weight)
    load_weights(other, state, path)
    other.eval()
    assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("expect", [{"stage": "segmentation"}, {"backbone": "resnet50"}, {"classes": ["mel", "nv"]}])
def test_foreign_checkpoint_refused(tmp_path, expect):
    model = _model()
    model(torch.randn(1, 3, 8, 8))
    path = save_checkpoint(tmp_path / "c.safetensors", model, META)
    key = next(iter(expect))
    with pytest.raises(CheckpointError, match=f"made for {key}="):
        load_checkpoint(path, expect=expect)


def test_shape_mismatch_names_file(tmp_path):
    model = _model()
    model(torch.randn(1, 3, 8, 8))
    path = save_checkpoint(tmp_path / "c.safetensors", model, META)
    state, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="c.safetensors"):
        load_weights(torch.nn.Linear(2, 2), state, path)


def test_pickle_file_is_refused_not_unpickled(tmp_path):
    evil = tmp_path / "model.safetensors"

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_metadata(evil)
    resume = tmp_path / "resume.pt"
    torch.save({"obj": Boom()}, resume)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_resume_state(resume)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "nope.safetensors")


def test_resume_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_resume_state(tmp_path / "last_state.pt", {"epoch": 3, "optimizer": opt.state_dict(), "best": 0.5})
    state = load_resume_state(path)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert state["epoch"] == 3 and state["best"] == 0.5
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_the_checks_before_a_stage_read_a_resume_state_once_without_its_tensors(tmp_path, monkeypatch):
    from dermpipe.engine import checkpoint

    path = tmp_path / "last_state.pt"
    weights = {"weight": torch.ones(3, 3)}
    optimizer = {"state": {0: {"exp_avg": torch.ones(3)}}}
    state = {"epoch": 2, "finished": True, "fingerprint": "abc", "settings": {"lr": 0.1}}
    checkpoint.save_resume_state(path, {"model": weights, "optimizer": optimizer, **state})
    loads = []
    load = checkpoint.load_resume_state
    monkeypatch.setattr(checkpoint, "load_resume_state", lambda p, **k: loads.append(p) or load(p, **k))
    summary = checkpoint.resume_summary(path)
    assert summary == {"epoch": 2, "finished": True, "fingerprint": "abc", "settings": {"lr": 0.1}}
    summary["settings"]["lr"] = 1.0  # a caller's change never reaches the next caller
    assert checkpoint.resume_summary(path)["settings"] == {"lr": 0.1} and len(loads) == 1
    checkpoint.save_resume_state(path, {"model": weights, "epoch": 3, "finished": False, "fingerprint": "abc"})
    assert checkpoint.resume_summary(path) == {"epoch": 3, "finished": False, "fingerprint": "abc"}  # a new file
    assert len(loads) == 2
    path.write_bytes(b"not a state")
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read safely"):
        checkpoint.resume_summary(path)
    path.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.resume_summary(path)
