"""Training tools: the pieces (dataset, sampler, metric, optimizer groups, checkpoint files) and the
scripts end to end on scikit-learn's digits written as an image folder (no downloads)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmengine")
pytest.importorskip("sklearn")

from visionlin.training import (ImageFolderDataset, RepeatedAugmentationSampler, TimmClassifier,  # noqa: E402
                                TopKAccuracy, collate_skipping_unreadable, latest_checkpoint,
                                load_model_weights)
from visionlin.training.checkpoint import AtomicLocalBackend, from_plain, to_plain  # noqa: E402
from zoo import load_tool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = str(ROOT / "tools" / "train.py"), str(ROOT / "tools" / "test.py")
VIG_DIGITS = str(ROOT / "configs" / "digits" / "vig_t_digits.py")
RAVLT_DIGITS = str(ROOT / "configs" / "digits" / "ravlt_t_digits.py")
SMALL_TRANSFORM = dict(input_size=32, is_training=False, crop_pct=1.0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    counts = load_tool("make_digits_folder").make_digits_folder(str(out), size=32)
    assert counts == {"train": 1348, "val": 449}
    return str(out)


def run_tool(args, timeout=600, env=None):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def logged_val_accuracy(work_dir):
    """The last validation top-1 the training run logged (mmengine's scalars.json)."""
    [scalars] = Path(work_dir).glob("*/vis_data/scalars.json")
    vals = [json.loads(line) for line in scalars.read_text().splitlines() if "accuracy/top1" in line]
    return vals[-1]["accuracy/top1"]


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


# --- pieces ----------------------------------------------------------------------------------------

def test_dataset_reads_the_folder_layout_and_skips_unreadable_images_with_a_count(tmp_path, digits):
    ds = ImageFolderDataset(digits, "val", transform=SMALL_TRANSFORM)
    assert ds.classes == [str(i) for i in range(10)] and len(ds) == 449
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10

    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        (root / cls / "ok.png").write_bytes((Path(digits) / "val" / "3").glob("*.png").__next__().read_bytes())
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    ds = ImageFolderDataset(str(root), transform=SMALL_TRANSFORM)
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        batch = collate_skipping_unreadable([ds[i] for i in range(len(ds))])
    assert batch["inputs"].shape == (2, 3, 32, 32) and batch["skipped"] == 1
    assert batch["labels"].tolist() == [0, 1]


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "dataset folder not found"),
    (lambda p: (p.mkdir(), (p / "a.png").write_bytes(b"x")), "not an image folder: expected one sub-folder per class"),
    (lambda p: (p.mkdir(), (p / "cls").mkdir(), (p / "cls" / "notes.txt").write_text("x")), "no images"),
])
def test_a_folder_that_is_not_an_image_folder_gets_a_clear_error(tmp_path, make, message):
    root = tmp_path / "root"
    make(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ImageFolderDataset(str(root))


def test_unknown_model_name_is_rejected_with_suggestions():
    with pytest.raises(ValueError, match=r"unknown model 'vig_tt'.*did you mean.*vig_t"):
        TimmClassifier("vig_tt")


def test_repeated_augmentation_sends_copies_to_different_ranks(monkeypatch):
    dataset = list(range(12))
    per_rank = []
    for rank in range(3):
        monkeypatch.setattr("mmengine.dataset.sampler.get_dist_info", lambda r=rank: (r, 3))
        sampler = RepeatedAugmentationSampler(dataset, shuffle=True, seed=1, num_repeats=3)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
    assert all(len(r) == 4 for r in per_rank)
    first_positions = [r[0] for r in per_rank]
    assert len(set(first_positions)) == 1          # one image, three augmented copies, three ranks
    assert sorted(sum(per_rank, [])).count(first_positions[0]) == 3


def test_top_k_accuracy_counts_labels_among_the_ranked_classes():
    metric = TopKAccuracy(topk=(1, 2))
    metric.process(None, [dict(ranked=torch.tensor([3, 1]), label=torch.tensor(3)),
                          dict(ranked=torch.tensor([0, 2]), label=torch.tensor(2)),
                          dict(ranked=torch.tensor([4, 5]), label=torch.tensor(1))])
    assert metric.compute_metrics(metric.results) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})


def test_optimizer_groups_exempt_the_models_no_weight_decay_list():
    from mmengine.optim import build_optim_wrapper
    model = TimmClassifier("vig_t", model_args=dict(embed_dim=64, depth=1, num_heads=2))
    wrapper = build_optim_wrapper(model, dict(constructor="TimmParamGroupsConstructor",
                                              optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)))
    decayed, exempt = sorted(wrapper.optimizer.param_groups, key=lambda g: g["weight_decay"], reverse=True)
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert any(p is model.model.pos_embed for p in exempt["params"])
    assert all(p.ndim > 1 for p in decayed["params"])
    assert sum(len(g["params"]) for g in (decayed, exempt)) == len(list(model.parameters()))


def test_atomic_backend_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "ckpt" / "epoch_1.pth"
    backend = AtomicLocalBackend()
    backend.put(b"complete", target)

    with pytest.raises(TypeError):
        backend.put(object(), target)        # the write fails midway
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_1.pth"]


def test_message_hub_round_trips_through_its_plain_form():
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance("test_plain_form")
    hub.update_scalar("train/loss", 0.5)
    hub.update_scalar("train/loss", 0.25)
    hub.update_info("eta", __import__("numpy").float64(3.0))
    state = hub.state_dict()
    back = from_plain(to_plain(state))
    assert back["log_scalars"]["train/loss"].data[0].tolist() == [0.5, 0.25]
    assert back["runtime_info"]["eta"] == 3.0


def test_latest_checkpoint_takes_the_highest_epoch(tmp_path):
    for name in ("epoch_2.pth", "epoch_10.pth", "epoch_9.pth", "epoch_3.pth.1234.tmp", "best.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "epoch_10.pth")


# --- scripts end to end ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", [VIG_DIGITS, RAVLT_DIGITS], ids=["vig_t-sized", "hierarchical"])
def test_training_reaches_accuracy_well_above_chance_and_test_tool_reproduces_it(tmp_path, digits, config):
    work = tmp_path / "work"
    result = run_tool([TRAIN, config, "--work-dir", str(work), "--data-root", digits,
                       "--cfg-options", "train_cfg.max_epochs=5"])
    assert "epoch 5/5 iter 43/43" in result.stdout             # the progress line
    logged = logged_val_accuracy(work)
    assert logged > 80.0                                         # chance is 10 %
    ckpt = latest_checkpoint(str(work))
    assert ckpt.endswith("epoch_5.pth")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []   # loads with weights_only=True
    out = tmp_path / "metrics.json"
    run_tool([TEST, config, ckpt, "--data-root", digits, "--out", str(out)])
    assert json.loads(out.read_text())["accuracy/top1"] == pytest.approx(logged, abs=1e-9)


@pytest.mark.slow
def test_run_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path, digits):
    args = [TRAIN, VIG_DIGITS, "--data-root", digits, "--deterministic", "--cfg-options", "train_cfg.max_epochs=3"]
    run_tool(args + ["--work-dir", str(tmp_path / "full")])
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, "--work-dir", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("epoch 3/3 iter 20/"):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "epoch_3.pth").exists() and (killed / "epoch_2.pth").exists()
    result = run_tool(args + ["--work-dir", str(killed), "--resume"])
    assert "resumed epoch: 2" in result.stdout + result.stderr
    full, resumed = weights(tmp_path / "full" / "epoch_3.pth"), weights(killed / "epoch_3.pth")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(tmp_path, digits):
    deterministic_data = ["train_cfg.max_epochs=2", "train_dataloader.dataset.transform.scale=(1.0,1.0)",
                          "train_dataloader.dataset.transform.ratio=(1.0,1.0)"]
    run_tool([TRAIN, VIG_DIGITS, "--data-root", digits, "--work-dir", str(tmp_path / "one"),
              "--cfg-options", *deterministic_data, "train_dataloader.batch_size=32"])
    run_tool(["-m", "torch.distributed.run", "--nproc-per-node", "2", TRAIN, VIG_DIGITS, "--data-root", digits,
              "--work-dir", str(tmp_path / "two"), "--cfg-options", *deterministic_data,
              "train_dataloader.batch_size=16"], env={"OMP_NUM_THREADS": "1"})
    one, two = weights(tmp_path / "one" / "epoch_2.pth"), weights(tmp_path / "two" / "epoch_2.pth")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4, msg=k)
    assert logged_val_accuracy(tmp_path / "two") == pytest.approx(logged_val_accuracy(tmp_path / "one"), abs=0.5)


@pytest.mark.slow
def test_fine_tuning_loads_a_checkpoint_into_a_new_class_count_and_resolution(tmp_path, digits):
    work = tmp_path / "pre"
    run_tool([TRAIN, VIG_DIGITS, "--data-root", digits, "--work-dir", str(work), "--tensorboard", "--cfg-options",
              "train_cfg.max_epochs=1"])
    assert list(work.glob("*/vis_data/events.out.tfevents.*"))          # --tensorboard wrote its log
    ckpt = latest_checkpoint(str(work))
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    model = TimmClassifier("vig_t", model_args=dict(num_classes=3, img_size=64, embed_dim=64, depth=4, num_heads=2),
                           init_checkpoint=ckpt)
    assert model.model.head.out_features == 3 and model.model.pos_embed.shape == (1, 16, 64)
    torch.testing.assert_close(model.model.blocks[0].attn.qkv_proj.weight, source["model.blocks.0.attn.qkv_proj.weight"])
    with pytest.raises(RuntimeError, match="does not match.*missing keys.*blocks.4"):
        load_model_weights(TimmClassifier("vig_t", model_args=dict(embed_dim=64, depth=5, num_heads=2,
                                                                   num_classes=10)).model, ckpt)


@pytest.mark.slow
def test_train_tool_rejects_unknown_models_and_missing_configs(tmp_path, digits):
    cfg = tmp_path / "bad.py"
    cfg.write_text(f"_base_ = ['{VIG_DIGITS}']\nmodel = dict(model_name='no_such_model')\n")
    result = subprocess.run([sys.executable, TRAIN, str(cfg), "--data-root", digits, "--work-dir", str(tmp_path / "w")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "unknown model 'no_such_model'" in result.stderr
    result = subprocess.run([sys.executable, TRAIN, str(tmp_path / "missing.py")], capture_output=True, text=True)
    assert result.returncode != 0 and "config not found" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py")
                                          if "_base_" not in p.parts))
def test_every_config_parses_and_builds_its_model(config):
    from mmengine.config import Config
    from mmengine.registry import MODELS
    cfg = Config.fromfile(str(ROOT / config))
    cfg.model.init_checkpoint = None          # fine-tune configs name a file the user provides
    model = MODELS.build(cfg.model)
    assert isinstance(model, TimmClassifier)
    assert cfg.train_dataloader.dataset.type == "ImageFolderDataset"
    assert any(h["type"] == "WeightsOnlyCheckpointHook" for h in cfg.custom_hooks)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend="local_atomic")


def test_amp_recipes_fall_back_to_float32_on_cpu_and_amp_flag_needs_cuda():
    train = load_tool("train")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    args = train.parse_args([str(ROOT / "configs" / "ravlt" / "ravlt_t_8xb128_in1k.py"), "--work-dir", "/tmp/unused"])
    cfg = train.build_config(args)
    assert cfg.optim_wrapper.type == "OptimWrapper" and "dtype" not in cfg.optim_wrapper
    args = train.parse_args([VIG_DIGITS, "--amp", "bf16"])
    with pytest.raises(SystemExit, match="--amp needs a CUDA GPU"):
        train.build_config(args)
