"""tools/distill.py (LinFusion distillation) and tools/generate.py, end to end on tiny offline pipelines (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_zoo import (tiny_dit, tiny_dit_pipeline, tiny_pixart_pipeline,  # skips without diffusers
                           tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_vae)

from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, DiTPipeline,  # noqa: E402
                       UNet2DModel)
from safetensors.torch import load_file  # noqa: E402
from zoo import load_tool  # noqa: E402

from visionlin.diffusion import LinDiTTransformer2DModel, linearize  # noqa: E402

distill = load_tool("distill")
generate = load_tool("generate")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a dog", "cat", "dog", "a cat and a dog"]
QUICK = ["--num-workers", "0", "--teacher-steps", "2", "--sample-steps", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are too small for threads to pay off on shared cores: one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next distill run in this process builds its own."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def no_accelerate_state_left_behind():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(folder / "tokenizer-src").save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline(folder / "tokenizer-src").save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pixart") / "pipe"
    tiny_pixart_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    """A tiny DiT pipeline folder with label names in model_index.json, as the released DiT repos have them."""
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    tiny_dit_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "cat", "1": "dog, puppy"}}))
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def image_folder(folder: Path, labels: list[str], size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    """Small PNGs of two kinds (warm squares, cool stripes; by label parity) with captions in metadata.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, label in enumerate(labels):
        width, height = size
        pixels = np.zeros((height, width, 3), np.uint8)
        if i % 2 == 0:
            pixels[...] = (200, 60, 40)
            x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
            pixels[y:y + height // 2, x:x + width // 2] = (250, 220, 60)
        else:
            pixels[...] = (30, 60, 180)
            pixels[:, int(rng.integers(0, 4))::4] = (120, 200, 250)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": label}))
    (folder / distill.METADATA_FILE).write_text("\n".join(lines) + "\n")
    return folder


def run_distill(pipeline: Path, out: Path, *extra: str) -> Path:
    reset_accelerate()
    distill.main(["--pipeline", str(pipeline), "--output-dir", str(out), *QUICK, *extra])
    return out


def log_rows(out: Path) -> list[dict]:
    return distill.read_log(out / "log.csv")


def student_loads_into(pipeline: Path, weights: Path):
    pipe = DiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    handle = linearize(pipe, weights=weights)
    saved = load_file(str(weights))
    assert handle.state_dict().keys() == saved.keys()
    assert all(torch.equal(t, saved[k]) for k, t in handle.state_dict().items())
    return pipe, handle


# ---------------------------------------------------------------- distill: end to end

def test_prompts_mode_writes_log_checkpoints_grids_plot_and_a_student_that_loads(sd_dir, prompts_file, tmp_path):
    out = run_distill(sd_dir, tmp_path / "run", "--prompts", str(prompts_file), "--max-steps", "4",
                      "--batch-size", "2", "--resolution", "16", "--checkpoint-every", "2", "--keep-checkpoints", "1",
                      "--eval-every", "2", "--eval-size", "2", "--sample-every", "2", "--num-samples", "3",
                      "--lr-warmup-steps", "2", "--samples-per-prompt", "2")
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in rows if r["eval_mse"] is not None] == [0, 2, 4]
    assert rows[0]["loss"] is None
    for r in rows[1:]:
        assert r["loss"] == pytest.approx(r["loss_target"] + 0.5 * r["loss_teacher"] + 0.5 * r["loss_attention"],
                                          rel=1e-4)
        assert r["loss_teacher"] > 0 and r["loss_attention"] > 0
    assert [r["lr"] for r in rows[1:]] == pytest.approx([0.5e-4, 1e-4, 1e-4, 1e-4])  # 2 warm-up steps

    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]  # only the last is kept
    final = out / "checkpoints" / "step_00000004"
    assert torch.load(final / "training_state.pt", weights_only=True)["step"] == 4
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png",
                                                                  "teacher.png"]
    assert Image.open(out / "samples" / "step_00000004.png").size == (32, 32)  # 3 images of 16 px, 2 per row
    assert Image.open(out / "loss_curve.png").size == (960, 600)
    cache = load_file(str(out / distill.TEACHER_CACHE))
    assert cache["train"].shape == (2 * len(PROMPTS), 4, 8, 8) and cache["eval"].shape == (2, 4, 8, 8)

    pipe, handle = student_loads_into(sd_dir, out / "student.safetensors")
    last_checkpoint = load_file(str(final / "student.safetensors"))
    assert all(torch.equal(t, last_checkpoint[k]) for k, t in handle.state_dict().items())
    for name in handle.layers:  # the teacher-initialised projections moved: it trained
        teacher_q = pipe.unet.get_submodule(name).to_q.weight
        assert not torch.equal(handle.processors[name].attention.to_q.weight, teacher_q)


def test_image_folder_mode_trains_on_captioned_images(sd_dir, tmp_path):
    data = image_folder(tmp_path / "images", ["a cat", "a dog", "cat", "dog", "a cat", "a dog"], size=(24, 20))
    out = run_distill(sd_dir, tmp_path / "run", "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                      "--resolution", "16", "--eval-size", "2", "--sample-every", "2", "--num-samples", "2",
                      "--caption-dropout", "0.5", "--num-workers", "1")
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["eval_mse"] is not None
    assert not (out / distill.TEACHER_CACHE).exists()
    assert Image.open(out / "samples" / "step_00000002.png").size == (32, 16)  # 2 images of 16 px
    student_loads_into(sd_dir, out / "student.safetensors")


def test_dit_distillation_takes_class_ids_and_label_names_and_continues_from_weights(dit_dir, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n1\npuppy\n0\n")
    common = ["--prompts", str(classes), "--batch-size", "2", "--sample-every", "3", "--eval-every", "1"]
    out = run_distill(dit_dir, tmp_path / "run", *common, "--max-steps", "3", "--feature-dim", "4")
    assert [r["eval_mse"] is not None for r in log_rows(out)] == [True] * 4
    assert Image.open(out / "samples" / "step_00000003.png").size == (32, 16)  # classes 0 and 1, 16 px each
    _, handle = student_loads_into(dit_dir, out / "student.safetensors")
    assert sorted(handle.layers) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert {spec.feature_dim for spec in handle.layers.values()} == {4}

    again = run_distill(dit_dir, tmp_path / "again", *common, "--max-steps", "1",
                        "--weights", str(out / "student.safetensors"))
    assert log_rows(again)[0]["eval_mse"] == log_rows(out)[-1]["eval_mse"]  # the same student on the same batch


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart"])
def test_the_student_is_conditioned_as_the_pipeline_conditions_its_denoiser(family, sd_dir, sdxl_dir, pixart_dir):
    """Text embeddings, SDXL's pooled embedding and time ids, PixArt's attention mask: what the pipeline itself feeds
    its denoiser (no CFG, at the training resolution)."""
    pipeline = {"sd": sd_dir, "sdxl": sdxl_dir, "pixart": pixart_dir}[family]
    pipe = DiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    denoiser = pipe.unet if family != "pixart" else pipe.transformer
    fed = []
    denoiser.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs), with_kwargs=True)
    captions = ["a cat", "a dog and a cat"]
    distill.run_pipeline(pipe, family, captions, height=24, width=24, steps=2, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(0), output_type="latent")
    ours = distill.text_conditioning(pipe, family, captions, 24, torch.device("cpu"))
    expected = {"sd": {"encoder_hidden_states"}, "sdxl": {"encoder_hidden_states", "added_cond_kwargs"},
                "pixart": {"encoder_hidden_states", "encoder_attention_mask", "added_cond_kwargs"}}[family]
    assert set(ours) == expected

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a is b is None or torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # the same ops, up to kernel choice

    for key in expected:
        assert same(ours[key], fed[0][key]), key
    if family == "sdxl":
        assert ours["added_cond_kwargs"]["time_ids"].tolist() == [[24, 24, 0, 0, 24, 24]] * 2


@pytest.mark.parametrize("family, source", [("sdxl", "prompts"), ("pixart", "prompts"), ("pixart", "images")])
def test_sdxl_and_pixart_students_distil_and_load(family, source, sdxl_dir, pixart_dir, prompts_file, tmp_path):
    pipeline = sdxl_dir if family == "sdxl" else pixart_dir
    data = (["--prompts", str(prompts_file)] if source == "prompts" else
            ["--data", str(image_folder(tmp_path / "images", ["a cat", "a dog", "cat", "dog", "a cat", "a dog"]))])
    out = run_distill(pipeline, tmp_path / "run", *data, "--max-steps", "2", "--batch-size", "2", "--resolution",
                      "16", "--eval-every", "1", "--eval-size", "2", "--sample-every", "2", "--num-samples", "2",
                      "--caption-dropout", "0.5")
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["eval_mse"] > 0 for r in rows)
    assert all(r["loss_teacher"] > 0 and r["loss_attention"] > 0 for r in rows[1:])
    assert Image.open(out / "samples" / "step_00000002.png").size == (32, 16)
    if source == "prompts":
        assert load_file(str(out / distill.TEACHER_CACHE))["train"].shape == (len(PROMPTS), 4, 8, 8)
    pipe, handle = student_loads_into(pipeline, out / "student.safetensors")
    assert len(handle.layers) == (8 if family == "sdxl" else 2)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    for name in handle.layers:  # trained: the teacher-initialised projections moved
        assert not torch.equal(handle.processors[name].attention.to_q.weight,
                               denoiser.get_submodule(name).to_q.weight)


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_caption_dropout_trains_on_the_empty_caption_or_null_class(family, sd_dir, dit_dir, prompts_file, tmp_path,
                                                                    monkeypatch):
    seen, conditioning = [], distill.Distiller.conditioning

    def spy(self, conditions, drop):
        null, got = (self.pipe.encode_prompt([""] * len(drop), self.device, 1, False)[0] if family == "sd"
                     else torch.full((len(drop),), 1000)), conditioning(self, conditions, drop)
        seen.append(torch.equal(got["encoder_hidden_states" if family == "sd" else "class_labels"], null))
        return got

    monkeypatch.setattr(distill.Distiller, "conditioning", spy)
    pipeline, extra = (sd_dir, ["--resolution", "16"]) if family == "sd" else (dit_dir, [])
    run_distill(pipeline, tmp_path / "run", "--prompts", str(prompts_file if family == "sd" else dit_classes(tmp_path)),
                "--max-steps", "2", "--batch-size", "2", "--sample-every", "0", "--caption-dropout", "1", *extra)
    assert seen == [False, True, True]  # the evaluation batch keeps its conditions; both training batches lose theirs


def dit_classes(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("0\n1\n")
    return path


def test_bf16_autocast_runs_on_the_cpu(sd_dir, prompts_file, tmp_path):
    out = run_distill(sd_dir, tmp_path / "run", "--prompts", str(prompts_file), "--max-steps", "2",
                      "--batch-size", "2", "--resolution", "16", "--sample-every", "2", "--mixed-precision", "bf16")
    rows = log_rows(out)
    assert all(np.isfinite(r["loss"]) for r in rows[1:]) and rows[-1]["eval_mse"] is not None
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "student.safetensors")).values())


# ---------------------------------------------------------------- the headline: distillation works

def train_dit_teacher(data: Path, out: Path, steps: int = 300) -> Path:
    """A tiny DiT pipeline whose transformer is trained as a denoiser of ``data``'s images.

    A random network is no denoiser of anything: distilling from it, the target term (the data's noise) and the
    teacher terms disagree, and the target term drives the student away from the teacher (see the next test)."""
    pipe = tiny_dit_pipeline()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    entries = [json.loads(line) for line in (data / distill.METADATA_FILE).read_text().splitlines()]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(data / e["file_name"]))).permute(2, 0, 1)
                          for e in entries]).float() / 127.5 - 1
    labels = torch.tensor([int(e["text"]) for e in entries])
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    model = pipe.transformer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        latents = posterior.sample(generator=generator) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (len(latents),), generator=generator)
        predicted = model(scheduler.add_noise(latents, noise, t), timestep=t, class_labels=labels).sample
        F.mse_loss(predicted[:, :4], noise).backward()
        optimizer.step()
        optimizer.zero_grad()
    pipe.save_pretrained(out)
    return out


@pytest.mark.slow
def test_distillation_halves_the_held_out_student_teacher_noise_prediction_mse(tmp_path):
    data = image_folder(tmp_path / "images", [str(i % 2) for i in range(12)])
    teacher = train_dit_teacher(data, tmp_path / "teacher")
    started = time.perf_counter()
    out = run_distill(teacher, tmp_path / "run", "--data", str(data), "--init", "fresh", "--lr", "1e-3",
                      "--batch-size", "4", "--max-steps", "300", "--eval-every", "50", "--eval-size", "4",
                      "--checkpoint-every", "300", "--sample-every", "0")
    seconds = time.perf_counter() - started
    evals = [(int(r["step"]), r["eval_mse"]) for r in log_rows(out) if r["eval_mse"] is not None]
    print(f"held-out student-teacher MSE by step: {evals}; {seconds:.1f} s")
    assert evals[0][0] == 0 and evals[-1][0] == 300
    assert evals[-1][1] <= 0.5 * evals[0][1], evals


def test_the_teacher_terms_keep_the_student_near_even_an_untrained_teacher(dit_dir, tmp_path):
    """An untrained teacher is no denoiser, so the target term alone drives the student away from it (4-7x the
    starting MSE in 100 steps with the teacher terms taken out, seeds 0-3); the teacher terms hold it (0.7-1.2x)."""
    data = image_folder(tmp_path / "images", [str(i % 2) for i in range(12)])
    out = run_distill(dit_dir, tmp_path / "run", "--data", str(data), "--init", "fresh", "--lr", "1e-3",
                      "--batch-size", "4", "--max-steps", "100", "--eval-every", "100", "--eval-size", "4",
                      "--checkpoint-every", "100", "--sample-every", "0")
    first, last = (r["eval_mse"] for r in log_rows(out) if r["eval_mse"] is not None)
    assert last <= 2 * first, (first, last)


@pytest.mark.slow
def test_two_processes_split_the_teacher_samples_and_train_together(sd_dir, prompts_file, tmp_path):
    """Two CPU processes (gloo) stand in for ``accelerate launch`` on two GPUs."""
    args = ["--prompts", str(prompts_file), "--samples-per-prompt", "3", "--max-steps", "2", "--batch-size", "2",
            "--resolution", "16", "--sample-every", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(ROOT / "tools" / "distill.py"), "--pipeline", str(sd_dir), *QUICK, *args,
                             "--output-dir", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "two" / "checkpoints" / "step_00000002" / "training_state.pt", weights_only=True)
    assert state["run"]["num_processes"] == 2 and len(state["rng"]) == 2  # one random stream per process
    assert [r["step"] for r in log_rows(tmp_path / "two")] == [0, 1, 2]
    student_loads_into(sd_dir, tmp_path / "two" / "student.safetensors")
    run_distill(sd_dir, tmp_path / "one", *args)
    two, one = (load_file(str(tmp_path / run / distill.TEACHER_CACHE)) for run in ("two", "one"))
    assert all(torch.equal(two[k], one[k]) for k in ("train", "eval"))  # per-sample seeds: same samples


# ---------------------------------------------------------------- resume and atomic checkpoints

RESUMABLE = ["--max-steps", "6", "--batch-size", "2", "--gradient-accumulation-steps", "3", "--resolution", "16",
             "--checkpoint-every", "3", "--eval-every", "3", "--eval-size", "2", "--sample-every", "0",
             "--lr-warmup-steps", "5"]


def test_resume_continues_at_the_saved_step_and_ends_where_an_uninterrupted_run_does(sd_dir, prompts_file, tmp_path,
                                                                                    monkeypatch, capsys):
    # 5 samples, 2 batches of 2 per epoch, 3 micro-batches per step: steps straddle epoch ends, and the resumed
    # run starts in the middle of an epoch (step 3 = 9 micro-batches = 4 epochs and 1 batch)
    data = ["--prompts", str(prompts_file)]
    whole = run_distill(sd_dir, tmp_path / "whole", *data, *RESUMABLE)

    calls, losses = [], distill.Distiller.losses

    def crash_in_step_5(self, batch):
        calls.append(1)
        if len(calls) == 13:  # steps 1-4 took 12 micro-batches; the checkpoint is at step 3
            raise RuntimeError("simulated crash")
        return losses(self, batch)

    monkeypatch.setattr(distill.Distiller, "losses", crash_in_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(sd_dir, tmp_path / "split", *data, *RESUMABLE)
    monkeypatch.undo()
    split = tmp_path / "split"
    assert [r["step"] for r in log_rows(split)] == [0, 1, 2, 3, 4]
    assert [p.name for p in (split / "checkpoints").iterdir()] == ["step_00000003"]
    capsys.readouterr()

    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run; pass --resume"):
        run_distill(sd_dir, split, *data, *RESUMABLE)
    with pytest.raises(SystemExit, match="changed: batch_size: 2 in the checkpoint, 1 now"):
        run_distill(sd_dir, split, *data, *RESUMABLE, "--resume", "--batch-size", "1")
    capsys.readouterr()
    run_distill(sd_dir, split, *data, *RESUMABLE, "--resume")
    output = capsys.readouterr()
    assert f"resuming from {split / 'checkpoints' / 'step_00000003'} at step 3" in output.out
    assert "3/6" in output.err and "0/6" not in output.err  # the progress bar starts at the saved step

    resumed, reference = log_rows(split), log_rows(whole)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5, 6]  # step 4 of the crashed run was replaced
    assert resumed == reference
    final, expected = load_file(str(split / "student.safetensors")), load_file(str(whole / "student.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_a_failed_checkpoint_save_leaves_no_half_written_checkpoint(dit_dir, tmp_path, monkeypatch):
    classes = dit_classes(tmp_path)
    real_save, saves = torch.save, []

    def disk_full_on_second_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    with pytest.raises(OSError, match="No space left"):
        run_distill(dit_dir, tmp_path / "run", "--prompts", str(classes), "--max-steps", "2", "--batch-size", "2",
                    "--checkpoint-every", "1", "--sample-every", "0")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001"]  # no step 2, no temporary folder
    assert torch.load(checkpoints / "step_00000001" / "training_state.pt", weights_only=True)["step"] == 1
    student_loads_into(dit_dir, checkpoints / "step_00000001" / "student.safetensors")
    assert not (tmp_path / "run" / "student.safetensors").exists()


# ---------------------------------------------------------------- distill: bad inputs

def unconditional_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    return tmp_path / "ddpm"


def broken_folder(tmp_path: Path, case: str) -> Path:
    folder = image_folder(tmp_path / case, ["a cat", "a dog", "cat", "dog", "a cat", "a dog"])
    if case == "empty":
        for path in folder.iterdir():
            path.unlink()
    elif case == "no captions file":
        (folder / distill.METADATA_FILE).unlink()
    elif case == "uncaptioned image":
        Image.new("RGB", (16, 16)).save(folder / "extra.png")
    elif case == "unreadable image":
        (folder / "03.png").write_bytes(b"not a png")
    elif case == "bad metadata line":
        with open(folder / distill.METADATA_FILE, "a") as f:
            f.write('{"file_name": "00.png"}\n')
    return folder


BAD_FOLDERS = {"empty": "holds no images", "no captions file": "has no metadata.jsonl",
               "uncaptioned image": "no caption in metadata.jsonl for extra.png",
               "unreadable image": r"unreadable image .*03\.png", "bad metadata line": r"metadata\.jsonl line 7"}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_invalid_image_folders_are_refused_naming_the_problem(case, sd_dir, tmp_path):
    folder = broken_folder(tmp_path, case)
    with pytest.raises(SystemExit, match=BAD_FOLDERS[case]) as error:
        run_distill(sd_dir, tmp_path / "run", "--data", str(folder))
    assert str(folder) in str(error.value)
    assert not (tmp_path / "run").exists()


def lindit_dir(tmp_path: Path) -> Path:
    pipe = DiTPipeline(transformer=LinDiTTransformer2DModel.from_dit(tiny_dit()), vae=tiny_vae(),
                       scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "lindit")
    return tmp_path / "lindit"


def test_bad_pipelines_options_and_sizes_are_refused_naming_them(sd_dir, prompts_file, tmp_path):
    prompts = ["--prompts", str(prompts_file)]
    cases = [
        ((lindit_dir(tmp_path), *prompts), "transformer is a LinDiTTransformer2DModel, not a DiTTransformer2DModel"),
        ((tmp_path, *prompts), "is not a diffusers pipeline folder"),
        ((tmp_path / "missing", *prompts), "does not exist"),
        ((unconditional_dir(tmp_path), *prompts), "does not support DDPMPipeline pipelines; supported: "
                                                   "StableDiffusionPipeline, StableDiffusionXLPipeline, PixArtAlpha"),
        ((sd_dir, *prompts, "--resolution", "20"), "--resolution 20 is not a multiple of 8"),
        ((sd_dir, "--prompts", str(tmp_path / "nope.txt")), "--prompts .*nope.txt is not a file"),
        ((sd_dir, *prompts, "--resume", str(tmp_path)), "is not a checkpoint folder"),
        ((sd_dir, *prompts, "--weights", str(tmp_path / "nope.safetensors")), "--weights .*nope.safetensors does not"),
    ]
    if not torch.cuda.is_available():
        cases.append(((sd_dir, *prompts, "--mixed-precision", "fp16"), "fp16 needs a CUDA GPU"))
    for (pipeline, *extra), message in cases:
        with pytest.raises(SystemExit, match=message):
            run_distill(pipeline, tmp_path / "run", *extra)


@pytest.mark.parametrize("data, message", [(["--data", "d", "--prompts", "p"], "not allowed with argument"),
                                           ([], "one of the arguments --data --prompts is required")])
def test_exactly_one_of_data_and_prompts(data, message, capsys):
    with pytest.raises(SystemExit) as error:
        distill.main(["--pipeline", "p", "--output-dir", "o", *data])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_the_command_line_exits_non_zero_with_the_message(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "distill.py"), "--pipeline", str(tmp_path),
                             "--prompts", "p.txt", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert f"distill.py: error: --pipeline {tmp_path} is not a diffusers pipeline folder" in result.stderr


# ---------------------------------------------------------------- generate

def student_file(pipeline: Path, tmp_path: Path) -> Path:
    """Linear-attention weights that differ from a fresh linearize(), as a distilled student's do."""
    handle = linearize(DiffusionPipeline.from_pretrained(pipeline, local_files_only=True))
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return handle.save(tmp_path / "student.safetensors")


def run_generate(pipeline: Path, out: Path, *extra: str) -> list[Path]:
    return generate.generate(generate.parse_args(["--pipeline", str(pipeline), "--out", str(out), "--steps", "2",
                                                  *extra]))


def test_generate_sd_with_a_student_at_a_non_default_size(sd_dir, tmp_path):
    weights = student_file(sd_dir, tmp_path)
    size = ["--height", "48", "--width", "64"]
    paths = run_generate(sd_dir, tmp_path / "out", "--weights", str(weights), "--prompt", "a cat", "a dog!",
                         "--num-images", "2", "--seed", "5", *size)
    assert [p.name for p in paths] == ["000_a-cat_seed5_64x48.png", "001_a-cat_seed6_64x48.png",
                                       "002_a-dog_seed7_64x48.png", "003_a-dog_seed8_64x48.png"]
    assert all(Image.open(p).size == (64, 48) for p in paths)
    assert Image.open(tmp_path / "out" / "grid.png").size == (128, 96)
    again = run_generate(sd_dir, tmp_path / "again", "--weights", str(weights), "--prompt", "a dog!", "--seed", "7",
                         *size)  # the third image, made again alone
    assert np.array_equal(np.array(Image.open(again[0])), np.array(Image.open(paths[2])))
    teacher = run_generate(sd_dir, tmp_path / "teacher", "--prompt", "a dog!", "--seed", "7", *size)
    assert not np.array_equal(np.array(Image.open(teacher[0])), np.array(Image.open(paths[2])))


@pytest.mark.parametrize("family", ["sdxl", "pixart"])
def test_generate_sdxl_and_pixart_with_a_student_at_a_non_square_size(family, sdxl_dir, pixart_dir, tmp_path):
    pipeline = sdxl_dir if family == "sdxl" else pixart_dir
    weights = student_file(pipeline, tmp_path)
    size = ["--height", "32", "--width", "48"]
    paths = run_generate(pipeline, tmp_path / "out", "--weights", str(weights), "--prompt", "a cat", "--seed", "3",
                         *size)
    assert [p.name for p in paths] == ["000_a-cat_seed3_48x32.png"] and Image.open(paths[0]).size == (48, 32)
    teacher = run_generate(pipeline, tmp_path / "teacher", "--prompt", "a cat", "--seed", "3", *size)
    assert not np.array_equal(np.array(Image.open(teacher[0])), np.array(Image.open(paths[0])))
    bad, why = ("44", "8 .the VAE factor, and UNet") if family == "sdxl" else ("42", "4 .the VAE factor x the patch")
    with pytest.raises(SystemExit, match=f"--width {bad}: sizes must be positive multiples of {why}"):
        generate.main(["--pipeline", str(pipeline), "--prompt", "a cat", "--width", bad, "--out", str(tmp_path / "bad")])


def test_generate_dit_classes_by_id_and_name_at_a_larger_size(dit_dir, tmp_path):
    weights = student_file(dit_dir, tmp_path)
    paths = run_generate(dit_dir, tmp_path / "out", "--weights", str(weights), "--class-labels", "1", "cat",
                         "--height", "32", "--width", "32")
    assert [p.name for p in paths] == ["000_class1_seed0_32x32.png", "001_class0-cat_seed1_32x32.png"]
    assert all(Image.open(p).size == (32, 32) for p in paths)  # the transformer was made for 16 px


def test_generate_lindit_pipeline_at_a_larger_size(dit_dir, tmp_path):
    lindit = lindit_dir(tmp_path)
    paths = run_generate(lindit, tmp_path / "out", "--class-labels", "3", "--height", "48", "--width", "48")
    assert Image.open(paths[0]).size == (48, 48)
    with pytest.raises(SystemExit, match="LinDiTTransformer2DModel, which has no softmax self-attention"):
        generate.main(["--pipeline", str(lindit), "--class-labels", "3", "--weights",
                       str(student_file(dit_dir, tmp_path))])


def test_generate_memory_options_reach_the_pipeline(sd_dir, tmp_path):
    args = generate.parse_args(["--pipeline", str(sd_dir), "--prompt", "a cat", "--vae-tiling", "--dtype", "bfloat16",
                                "--height", "64", "--width", "64"])
    pipe, family = generate.build_pipeline(args)
    assert family == "sd" and pipe.vae.use_tiling and pipe.unet.dtype == torch.bfloat16
    paths = run_generate(sd_dir, tmp_path / "out", "--prompt", "a cat", "--vae-tiling", "--height", "64",
                         "--width", "64")
    assert Image.open(paths[0]).size == (64, 64)


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a cat", "--height", "36"], "--height 36: sizes must be positive multiples of 8"),
    (["--prompt", "a cat", "--width", "0"], "--width 0: sizes must be positive multiples of 8"),
    (["--class-labels", "cat"], "StableDiffusionPipeline takes --prompt, not --class-labels"),
    (["--prompt", "a cat", "--cpu-offload"], "--cpu-offload needs --device cuda"),
    pytest.param(["--prompt", "a cat", "--device", "cuda"], "--device cuda: no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU")),
])
def test_generate_refuses_bad_sizes_and_options_for_sd(extra, message, sd_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        generate.main(["--pipeline", str(sd_dir), "--out", str(tmp_path), *extra])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--class-labels", "cat", "--height", "32", "--width", "48"], "DiTPipeline generates square images"),
    (["--class-labels", "cat", "--height", "14", "--width", "14"],
     "--height 14 and --width 14: sizes must be positive multiples of 4"),
    (["--class-labels", "tiger"], "'tiger' is not a class of the pipeline"),
    (["--class-labels", "1000"], "class id 1000 is out of range"),
])
def test_generate_refuses_bad_sizes_and_classes_for_dit(extra, message, dit_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        generate.main(["--pipeline", str(dit_dir), "--out", str(tmp_path), *extra])
    assert not any(tmp_path.iterdir())


def test_grid_tiles_of_very_large_images_are_shrunk_keeping_the_aspect_ratio():
    assert generate.grid_tile(Image.new("RGB", (2048, 1200))).size == (512, 300)
    assert generate.grid_tile(Image.new("RGB", (64, 48))).size == (64, 48)


def test_generate_refuses_weights_of_another_model(sd_dir, dit_dir, tmp_path):
    weights = student_file(dit_dir, tmp_path)
    with pytest.raises(SystemExit, match="cannot load --weights .*does not match the model's layers"):
        generate.main(["--pipeline", str(sd_dir), "--prompt", "a cat", "--weights", str(weights),
                       "--out", str(tmp_path / "out")])
