"""Checkpoints from someone else: a crafted manifest or checkpoint never touches a file outside its checkpoint,
never loads an unlisted or non-tensor file, and a bad one is refused (or passed over by ``auto``) in one line.

Every case starts from a real checkpointed run of a tiny Llama (or a standalone CheckpointManager's checkpoints)
and a sibling "victim" tree whose every byte, link and name is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from hf_optcore.checkpoint_manager import CheckpointManager, resume, retention, storage
from hf_optcore.checkpoint_manager.ownership import plan_run
from hf_optcore.config import CheckpointConfig
from hf_optcore.errors import CheckpointError
from hf_optcore.tiny import build_tiny_model
from tests._checkpoint_helpers import make_config, make_trainer


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): file bytes' sha256 and mode, link targets, directories."""
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def make_victim(root: Path) -> Path:
    victim = root / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "victim.txt").write_text("do not delete")
    (victim / "sub" / "victim_abs.txt").write_text("nor this")
    (victim / "optimizer.pt").write_bytes(b"someone else's file")
    return victim


def entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # what a careful forger writes


def edit_manifest(ckpt: Path, change) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    change(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished run with checkpoint-1 and checkpoint-2 (every step saved), copied afresh by each test."""
    out = tmp_path_factory.mktemp("base") / "run"
    make_trainer(out, max_steps=2, ga=1, every=1).train()
    assert [c.step for c in storage.list_complete(out)] == [1, 2]
    return out


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    return out


# ---- every escape form -----------------------------------------------------------------------------


def _dotdot(ckpt, victim):
    edit_manifest(ckpt, lambda m: m["files"].update({"../../victim/victim.txt": entry(victim / "victim.txt")}))


def _absolute(ckpt, victim):
    target = victim / "sub" / "victim_abs.txt"
    edit_manifest(ckpt, lambda m: m["files"].update({str(target): entry(target)}))


def _normalises_outside(ckpt, victim):
    edit_manifest(ckpt, lambda m: m["files"].update({"components/../../../victim/victim.txt":
                                                     entry(victim / "victim.txt")}))


def _through_a_linked_directory(ckpt, victim):
    (ckpt / "shared").symlink_to(victim)
    edit_manifest(ckpt, lambda m: m["files"].update({"shared/victim.txt": entry(victim / "victim.txt")}))


def _a_linked_file(ckpt, victim):
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "optimizer.pt").symlink_to(victim / "optimizer.pt")
    edit_manifest(ckpt, lambda m: m["files"].update({"optimizer.pt": entry(victim / "optimizer.pt")}))


def _a_directory(ckpt, victim):
    edit_manifest(ckpt, lambda m: m["files"].update({"components": entry(victim / "victim.txt")}))


def _the_checkpoint_is_a_link(ckpt, victim):
    # A complete, valid checkpoint that lives outside, linked in as checkpoint-1.
    shutil.copytree(ckpt, victim / "elsewhere")
    shutil.rmtree(ckpt)
    ckpt.symlink_to(victim / "elsewhere")


ESCAPES = {
    "dotdot": (_dotdot, "leaves or escapes the checkpoint directory"),
    "absolute": (_absolute, "is an absolute path, outside the checkpoint"),
    "normalises-outside": (_normalises_outside, "leaves or escapes the checkpoint directory"),
    "linked-directory": (_through_a_linked_directory, "passes through a symbolic link (shared)"),
    "linked-file": (_a_linked_file, "passes through a symbolic link (optimizer.pt)"),
    "directory-entry": (_a_directory, "'components' is a directory"),
    "checkpoint-is-a-link": (_the_checkpoint_is_a_link, "checkpoint-1 is a symbolic link"),
}


@pytest.mark.parametrize("form", list(ESCAPES))
def test_a_crafted_checkpoint_never_touches_anything_outside_it(run, tmp_path, form):
    craft, reason = ESCAPES[form]
    victim = make_victim(tmp_path)
    craft(run / "checkpoint-1", victim)
    outside = tree(victim)
    everything = tree(tmp_path)

    # Named explicitly: one error naming why, and nothing anywhere changed.
    with pytest.raises(CheckpointError) as info:
        make_trainer(run, max_steps=3, ga=1, every=1, resume_from=str(run / "checkpoint-1"),
                     allow_changes=["training.max_steps"]).train()
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert tree(tmp_path) == everything

    # Retention: resuming checkpoint-2 (kept: it was resumed from) with keep_last=1 prunes checkpoint-3 once
    # checkpoint-4 counts; the crafted checkpoint-1 is not a checkpoint: neither resumed, counted nor deleted.
    make_trainer(run, max_steps=4, ga=1, every=1, keep_last=1, resume_from="auto",
                 allow_changes=["training.max_steps"]).train()
    assert [c.step for c in storage.list_complete(run)] == [2, 4]
    assert os.path.lexists(run / "checkpoint-1") and not os.path.lexists(run / "checkpoint-3")
    assert tree(victim) == outside

    # Overwrite: a new run saves step 1 again over the crafted checkpoint-1, writing through nothing.
    make_trainer(run, max_steps=1, ga=1, every=1, keep_last=1, overwrite=True).train()
    assert not (run / "checkpoint-1").is_symlink() and storage.verify(run / "checkpoint-1")
    assert tree(victim) == outside


def test_a_directory_entry_or_a_missing_listed_file_never_raises_anything_but_a_checkpoint_error(tmp_path):
    model = build_tiny_model("llama", seed=0)
    mgr = CheckpointManager(CheckpointConfig(keep_last=1), tmp_path / "out", model)
    path = mgr.save(1)
    edit_manifest(path, lambda m: m["files"].update({"components": {"size": 1, "sha256": "0" * 64}}))
    assert storage.read_manifest(path) is None and "is a directory" in storage.manifest_problem(path)
    assert storage.delete(path) is False and (path / "model.safetensors").is_file()  # nothing deleted
    mgr.save(2)  # retention runs over it: it is not a checkpoint, so it stays
    assert path.is_dir() and [c.step for c in mgr.checkpoints()] == [2]


# ---- random edits of a valid manifest ------------------------------------------------------------------

_JUNK = ["..", "/", ".", "", "~", "a/../..", "./model.safetensors", "components/", "components//ema.pt",
         "components\\..\\..\\victim.txt", "\x00", "\u2024\u2024/victim.txt", "x" * 300, "model.safetensors/..",
         "../run/checkpoint-2/model.safetensors", "../../../../../../../../etc/hostname"]


def _random_edit(rnd: random.Random, ckpt: Path, victim: Path, kind: int | None = None) -> None:
    if ckpt.is_symlink():
        return  # already a link out: editing "its" manifest would be the test writing outside, not hf_optcore
    text = (ckpt / "manifest.json").read_text() if (ckpt / "manifest.json").is_file() else "{}"
    try:
        m = json.loads(text)
    except ValueError:
        m = {}
    if not isinstance(m, dict):
        m = {}
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    targets = [victim / "victim.txt", victim / "sub" / "victim_abs.txt", victim / "optimizer.pt"]
    kind = rnd.randrange(12) if kind is None else kind
    if kind == 0:  # an outside file by a relative path
        t = rnd.choice(targets)
        files[os.path.relpath(t, ckpt)] = entry(t)
    elif kind == 1:  # by an absolute path
        t = rnd.choice(targets)
        files[str(t)] = entry(t)
    elif kind == 2:  # junk names
        files[rnd.choice(_JUNK)] = rnd.choice([entry(targets[0]), {}, None, {"size": "1", "sha256": 5}])
    elif kind == 3 and files:  # rename an entry to an escape
        old = rnd.choice(sorted(files))
        files[f"{'../' * rnd.randint(1, 4)}{old}"] = files.pop(old)
    elif kind == 4:  # a link inside, listed
        link = ckpt / f"link{rnd.randrange(1000)}"
        if not os.path.lexists(link):
            link.symlink_to(rnd.choice([victim, targets[0], Path("/")]))
        files[f"{link.name}/victim.txt" if rnd.random() < 0.5 else link.name] = entry(targets[0])
    elif kind == 5:
        m["files"] = rnd.choice([[], "model.safetensors", None, 7, {"model.safetensors": []}])
    elif kind == 6:
        m["step"] = rnd.choice([-1, "2", None, 2.5, 10 ** 30, True])
    elif kind == 7:
        for key in rnd.sample(sorted(m) or ["files"], k=1):
            m.pop(key, None)
    elif kind == 8:
        m["topology"] = rnd.choice([{"world_size": 10 ** 9}, {"world_size": -3}, {"world_size": "2"}, ["world_size"],
                                    "x", None])
        m["components"] = rnd.choice([["../../victim/victim"], "ema", [1, 2], None])
        m["metrics"] = rnd.choice([{"eval_loss": "nan"}, "x", [["eval_loss", 1.0]], None])
    elif kind == 9:  # not JSON, or not an object
        (ckpt / "manifest.json").write_text(rnd.choice(["{", "[]", "null", "\"x\"", "{\"files\": {}"]))
        return
    elif kind == 10 and ckpt.is_dir() and not ckpt.is_symlink():  # the checkpoint itself becomes a link
        shutil.rmtree(ckpt)
        ckpt.symlink_to(victim)
        return
    elif files:  # a valid-looking entry whose bytes are someone else's
        files[rnd.choice(sorted(files))] = entry(rnd.choice(targets))
    if kind != 5:
        m["files"] = files
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _standalone_operations(out: Path) -> None:
    """Retention, a re-save of a step (overwrite), resume and leftover removal, as the library runs them."""
    model = build_tiny_model("llama", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(CheckpointConfig(keep_last=1), out, model, opt)
    for step in (2, 3):  # 2 replaces an existing step; then retention prunes down to one
        mgr.save(step)
    try:
        mgr.load("latest")
    except CheckpointError:
        pass
    storage.prepare_resave(out / "checkpoint-1")  # what a Trainer's save of step 1 does first (overwrite)
    for c in storage.list_unmanifested(out) + [c.path for c in storage.list_complete(out)]:
        try:
            storage.verify(c)
        except CheckpointError:
            pass
    for c in retention.to_prune(storage.list_complete(out), CheckpointConfig(keep_last=1), retention.Ranking()):
        storage.delete(c.path)
    storage.remove_leftovers(out)


@pytest.mark.parametrize("seed", range(3))
def test_random_manifest_edits_never_change_anything_outside_the_output_directory(tmp_path, seed):
    rnd = random.Random(seed)
    victim = make_victim(tmp_path)
    outside = tree(victim)
    for round_ in range(12):
        out = tmp_path / f"out{round_}"
        model = build_tiny_model("llama", seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mgr = CheckpointManager(CheckpointConfig(keep_last=100), out, model, opt, components={})
        for step in (1, 2):
            mgr.save(step)
        for _ in range(rnd.randint(1, 4)):
            _random_edit(rnd, out / f"checkpoint-{rnd.choice([1, 2])}", victim)
        _standalone_operations(out)
        # The run-level readers see the same directory: they may refuse it (one line), never raise anything else.
        for spec in ("auto", str(out / "checkpoint-1"), str(out / "checkpoint-2"), str(out)):
            try:
                resume.find(spec, out)
            except CheckpointError as exc:
                assert "\n" not in str(exc)
            plan_run(make_config(out, resume_from=spec), spec)
        assert tree(victim) == outside, f"seed {seed}, round {round_}"


def test_random_manifest_edits_under_the_trainer_never_change_anything_outside(run, tmp_path):
    rnd = random.Random(1234)
    victim = make_victim(tmp_path)
    outside = tree(victim)
    for _ in range(3):  # escapes into checkpoint-1 (pruned by keep_last=1, replaced by overwrite), junk into 2
        _random_edit(rnd, run / "checkpoint-1", victim, kind=rnd.choice([0, 1, 3, 4, 10, 11]))
    _random_edit(rnd, run / "checkpoint-2", victim)
    for checkpoint in ({"resume_from": "auto", "keep_last": 1, "allow_changes": ["training.max_steps"]},
                       {"overwrite": True, "keep_last": 1}):
        try:
            make_trainer(run, max_steps=3, ga=1, every=1, **checkpoint).train()
        except CheckpointError as exc:
            assert "\n" not in str(exc)
    assert tree(victim) == outside


# ---- what a manifest must list, and what a resume may load ------------------------------------------------


def test_an_empty_manifest_or_an_unlisted_swapped_optimizer_does_not_verify(run, caplog):
    from hf_optcore.checkpoint_manager.components import rank_file

    newest = run / "checkpoint-2"
    edit_manifest(newest, lambda m: m.update(files={}))
    with pytest.raises(CheckpointError, match="is there but not listed in the manifest"):
        storage.verify(newest)
    # A real manifest minus the optimizer, whose file is swapped for another step's.
    listed = [str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"]
    edit_manifest(newest, lambda m: m.update(files={rel: entry(newest / rel) for rel in listed
                                                    if rel != "optimizer.pt"}))
    shutil.copy(run / "checkpoint-1" / "optimizer.pt", newest / "optimizer.pt")
    with pytest.raises(CheckpointError, match="file 'optimizer.pt' is there but not listed in the manifest"):
        storage.verify(newest)
    (newest / "optimizer.pt").unlink()  # and gone altogether: transformers would resume with a fresh optimizer
    with pytest.raises(CheckpointError, match="does not list optimizer.pt"):
        storage.verify(newest)
    assert rank_file(0) in storage.read_manifest(newest)["files"]
    bare = run / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({"schema_version": 1, "step": 2, "files": {}}))
    with pytest.raises(CheckpointError, match="its manifest does not list the model weights"):
        storage.verify(bare)
    t = make_trainer(run, max_steps=3, ga=1, every=1, resume_from="auto", allow_changes=["training.max_steps"])
    with caplog.at_level("WARNING"):
        t.train()
    assert "does not list optimizer.pt, which every checkpoint of its kind holds" in caplog.text
    assert f"falling back to '{run / 'checkpoint-1'}'" in caplog.text
    assert t.optcore_checkpointing.resume_path == run / "checkpoint-1"


def test_save_only_model_checkpoints_need_no_optimizer(tmp_path):
    out = tmp_path / "run"
    cfg = make_config(out, max_steps=2, ga=1, every=1)
    cfg.training.extra_args["save_only_model"] = True
    from hf_optcore.tiny import build_tiny_model as tiny
    from hf_optcore.trainer import OptCoreTrainer
    from tests._checkpoint_helpers import TokenDataset

    OptCoreTrainer(model=tiny("llama", seed=0), args=cfg, train_dataset=TokenDataset()).train()
    manifest = storage.verify(out / "checkpoint-2")
    assert manifest["save_only_model"] is True and "optimizer.pt" not in manifest["files"]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tamper(ckpt: Path, marker: Path, name: str = "optimizer.pt") -> None:
    torch.save({"state": _Evil(marker)}, ckpt / name)  # torch's own pickle protocol: GLOBAL posix.system
    edit_manifest(ckpt, lambda m: m["files"].update({name: entry(ckpt / name)}))  # consistent sha256 and size


def test_a_tampered_pickle_falls_back_with_auto_and_is_one_error_when_named(run, tmp_path, caplog):
    marker = tmp_path / "pwned"
    _tamper(run / "checkpoint-2", marker)
    message = (f"checkpoint '{run / 'checkpoint-2'}': file 'optimizer.pt' is not a plain tensor file (possible "
               f"tampering")
    with pytest.raises(CheckpointError) as info:
        make_trainer(run, max_steps=3, ga=1, every=1, resume_from=str(run / "checkpoint-2"),
                     allow_changes=["training.max_steps"]).train()
    assert message in str(info.value) and "it names posix.system" in str(info.value) and "\n" not in str(info.value)
    t = make_trainer(run, max_steps=3, ga=1, every=1, resume_from="auto", allow_changes=["training.max_steps"])
    with caplog.at_level("WARNING"):
        t.train()
    assert f"{message}" in caplog.text and f"; falling back to '{run / 'checkpoint-1'}'" in caplog.text
    assert t.state.global_step == 3 and t.optcore_checkpointing.resume_path == run / "checkpoint-1"
    assert not marker.exists()  # nothing was executed


def test_a_tampered_pickle_in_a_plain_transformers_checkpoint_is_refused_before_transformers_loads_it(run, tmp_path):
    ckpt = run / "checkpoint-2"
    (ckpt / "manifest.json").unlink()  # a plain transformers checkpoint now: no integrity check, still no code
    marker = tmp_path / "pwned"
    torch.save({"state": _Evil(marker)}, ckpt / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"file 'optimizer.pt' is not a plain tensor file \(possible tampering; "
                                              r"torch.load\(weights_only=True\) refuses it: it names posix.system"):
        make_trainer(run, max_steps=3, ga=1, every=1, resume_from=str(ckpt), allow_changes=["training.max_steps"]).train()
    assert not marker.exists()


@pytest.mark.slow
def test_a_tampered_pickle_named_to_the_recipe_is_one_error_line(tmp_path, monkeypatch, capsys):
    from hf_optcore.recipes import sft

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    base = ["--no-samples", "--config", str(repo / "recipes" / "configs" / "tiny_smoke.yaml"), f"output_dir={out}",
            "training.max_steps=2", "checkpoint.every_n_steps=2", "data.max_train_samples=32",
            "data.max_eval_samples=8", "training.write_report=false"]
    assert sft.main(base) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"
    _tamper(out / "checkpoint-2", marker, "scheduler.pt")
    assert sft.main([*base, f"checkpoint.resume_from={out / 'checkpoint-2'}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "file 'scheduler.pt' is not a plain tensor file (possible tampering" in errors[0]
    assert not marker.exists()


# ---- a run folder is not a checkpoint ----------------------------------------------------------------------


def test_a_run_folder_as_resume_from_is_refused_naming_its_checkpoints(run, tmp_path):
    assert (run / "trainer_state.json").is_file()  # the final state: it looked like a transformers checkpoint
    with pytest.raises(CheckpointError) as info:
        make_trainer(tmp_path / "other", max_steps=3, ga=1, every=1, resume_from=str(run)).train()
    assert str(info.value) == (f"checkpoint.resume_from: '{run}' is a run's output directory, not a checkpoint (it "
                               f"holds checkpoint-1, checkpoint-2: name one of them, or use 'auto'); resuming it "
                               f"would load its final weights with a fresh optimizer and random state")
    assert not list((tmp_path / "other").glob("checkpoint-*")) and not (tmp_path / "other" / "run.json").exists()
    # Without hf_optcore owning the directory (plain TrainingArguments), the same.
    with pytest.raises(CheckpointError, match="is a run's output directory, not a checkpoint"):
        resume.find(str(run), tmp_path / "other")
