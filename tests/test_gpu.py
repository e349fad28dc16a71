"""The GPU tier (`make test-gpu`, which runs `-m gpu`): what only a GPU can check. A bf16 distill step against
float32, `--compile` without recompiles as ρ moves, bench's timer on work that runs after the call returns,
two DDP processes against one, and vLLM serving a compressed student token for token like transformers.

Each check is one function run on every device in DEVICES. Its "cpu" case runs with the rest of the suite
on tiny models and shows that the check itself works (and can fail); its "cuda" case carries the `gpu`
marker and skips where `torch.cuda.is_available()` is false, as in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import compressed_student, distill_setting, read_log, tiny_config, vllm_python, vllm_teacher
from safetensors.torch import load_file
from typer.testing import CliRunner

from bltool import load_model
from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.cli import app
from bltool.models import devices
from bltool.models.compiling import compile_layers
from bltool.options import from_flags
from bltool.serve.timing import measure
from bltool.stages import distill
from bltool.train import distributed
from bltool.train.budget import BudgetConfig, BudgetController

HERE = Path(__file__).parent
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                             reason="CUDA is not available (the gpu tier: `make test-gpu` on a machine with a GPU)")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA])
DEVICES = ["cpu", CUDA]
SLOW_DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), CUDA]  # checks that start processes or compile


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tokenizer):
    return distill_setting(tmp_path_factory.mktemp("gpu"), tokenizer)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}


# -- bf16 against float32 --------------------------------------------------------------------------------

# bf16 keeps 8 significant bits: each rounding is off by at most u = 2⁻⁸ ≈ 0.4% relative. The bf16 step rounds
# the frozen weights (teacher and the student's base) and the activations between them (on CUDA, autocast's
# matmul inputs); the loss and its gradient are sums of many such products, whose rounding errors partly
# cancel, while the loss itself is computed in float32 (bltool.train.losses upcasts the logits). The loss, its
# KL and CE parts then stay within 4u (1.6%) of float32's, and the gradient of the trained LoRA factors and
# gates within 8u (3.1%) in relative L2 norm. Measured on the CPU: 0.2% (KL; loss and CE 0.006%) and 0.7%
# (gradient). Without the upcast (the softmax in bf16) the loss is 6% off and the KL negative.
LOSS_RTOL, GRAD_RTOL = 4 * 2**-8, 8 * 2**-8


def _distill_step(setting, out: Path, device: str, dtype: str):
    """One budgeted-lora step with the frozen weights in `dtype`, from LoRA factors drawn on the host (the
    same on every device; B ≠ 0, so that A and the gates have a gradient too). Returns the step's log row,
    the gradient the optimizer stepped with (float32, on the host) and the state."""
    config = from_flags(distill.DistillConfig,
        student=str(setting["student"]), data=str(setting["data"]), teacher=str(setting["teacher"]), out=str(out),
        method="budgeted-lora", budget=0.4, tokens=50 * 4 * 32, batch_size=4, rank=4, lora_alpha=8.0,
        lora_dropout=0.0, save_every=0, device=device, dtype=dtype)
    run, state = distill.prepare(config, distributed.setup(device))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in state.adapted:
            for param in (module.lora_A, module.lora_B):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    grads = []
    state.optimizer.register_step_pre_hook(
        lambda *_: grads.append(torch.cat([p.grad.detach().float().flatten().cpu() for p in state.params])))
    try:
        row = distill.train_step(run, state)
    finally:
        state.prefetch.close()
    return row, grads[0], run, state


@pytest.fixture(scope="module")
def float32_step(setting, tmp_path_factory):
    """The reference: the same step in float32 on the CPU (no autocast there)."""
    row, grad, _, _ = _distill_step(setting, tmp_path_factory.mktemp("f32") / "out", "cpu", "float32")
    return row, grad


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_distill_step_is_float32_within_bf16_rounding(device, dtype, setting, float32_step, monkeypatch,
                                                             tmp_path):
    """--dtype bfloat16, and --dtype auto where it means bf16: on CUDA, and on a CPU with native bf16 (patched
    in here, so that the check runs on every CPU: bf16 is emulated where it is not native)."""
    monkeypatch.setenv("BLTOOL_CPU_BF16", "1")
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    row, grad, run, state = _distill_step(setting, tmp_path / "out", device, dtype)
    want_row, want_grad = float32_step
    # what ran was the bf16 step: frozen weights in bf16, the trained parameters in float32
    assert run.frozen_dtype == torch.bfloat16
    assert {p.dtype for p in run.teacher.parameters()} == {torch.bfloat16}
    assert all(m.base.weight.dtype == torch.bfloat16 for _, m in state.adapted)
    assert {p.dtype for p in state.params} == {torch.float32}
    assert not torch.equal(grad, want_grad)  # bf16 did round something (else this test compares float32 twice)
    for key in ("loss", "kl", "ce"):
        assert row[key] == pytest.approx(want_row[key], rel=LOSS_RTOL), key
    assert row["grad_norm"] == pytest.approx(want_row["grad_norm"], rel=GRAD_RTOL)
    error = float((grad - want_grad).norm() / want_grad.norm())
    assert error <= GRAD_RTOL, f"gradient off by {error:.2%} in relative L2 norm (tolerance {GRAD_RTOL:.2%})"


# -- --compile: no recompiles as ρ moves -----------------------------------------------------------------


def _compile_student(device: str, layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64, layers, tied=True), dtype=torch.float32)
    adapted = inject_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for _, m in adapted:
            m.lora_B.normal_(0, 0.02)  # a LoRA path that changes the output
    return model.to(device), adapted


@pytest.mark.parametrize("device", SLOW_DEVICES)
def test_compiled_layers_recompile_when_a_module_stops_its_dense_matmul_not_as_rho_moves(device):
    """Regional compilation of a budgeted student while the controller lowers ρ to 0: compiled equals eager at
    every step, and a new graph is compiled only at a step where the set of modules that skip their dense
    matmul is one not seen before (a compiled graph guards on that branch, never on ρ's value)."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, eager_adapted = _compile_student(device)
    model = copy.deepcopy(eager)
    adapted = [m for m in model.modules() if type(m).__name__ == "GatedLoRALinear"]
    assert compile_layers(model) == 2
    steps = 24
    controller = BudgetController([m.dense_macs for m in adapted], BudgetConfig(0.0, 0.1, 0.5, 0.5, 0.05), steps)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    seen_rho, seen_skips, compiled_at = set(), set(), []
    for step in range(steps):
        for m, (_, e), rho in zip(adapted, eager_adapted, controller.rho):
            m.set_rho(rho)
            e.set_rho(rho)
        seen_rho.add(tuple(controller.rho))
        skips = tuple(r == 0.0 for r in controller.rho)
        before = counters["stats"]["unique_graphs"]
        out = model(input_ids=ids).logits
        want = eager(input_ids=ids).logits
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        out.float().pow(2).mean().backward()  # the backward compiles too
        model.zero_grad(set_to_none=True)
        if counters["stats"]["unique_graphs"] > before:
            compiled_at.append(step)
            assert skips not in seen_skips, (f"step {step} compiled a new graph for ρ {controller.rho}, though the "
                                             "same modules skipped their dense matmul at an earlier step")
        seen_skips.add(skips)
        controller.step()
    assert all(r == 0.0 for r in controller.rho)  # ρ decayed to 0: every module skips its dense matmul
    assert len(seen_rho) > 10  # ρ took many values, and the graphs only changed with the skips:
    assert 1 <= len(compiled_at) <= len(seen_skips), compiled_at
    # and at most one graph per layer and set of its 2 modules skipping: ≤ 2 × (2 + 1)
    assert counters["stats"]["unique_graphs"] <= 6, counters["stats"]["unique_graphs"]


# -- bench: the timer waits for the device ---------------------------------------------------------------


def _deferred_work(device: str):
    """A call whose work takes ~20–50 ms: on CUDA a spin kernel, queued and returned from at once (a timer that
    does not wait for the device would see only the launch); on the CPU a sleep, done when the call returns."""
    if device == "cuda":
        return lambda: torch.cuda._sleep(50_000_000)  # clock cycles: 25 ms at 2 GHz
    return lambda: time.sleep(0.02)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_bench_times_the_devices_work_not_the_launch(device, tiny_llama, tmp_path):
    work = _deferred_work(device)
    work()  # warm-up (the kernel's first launch loads it)
    _synchronize(device)
    durations, launches = [], []
    for _ in range(3):  # the work's duration, timed from the host around a synchronised call
        begin = time.perf_counter()
        work()
        launches.append(time.perf_counter() - begin)
        _synchronize(device)
        durations.append(time.perf_counter() - begin)
    duration = sorted(durations)[1]
    if device == "cuda":  # the premise: the call returns long before its work is done
        assert max(launches) < duration / 4, (launches, duration)
    timing = measure({"work": work}, warmup=1, repeats=3, device=device)["work"]
    assert 0.8 * duration <= timing["median_s"] <= 1.5 * duration + 0.005, (timing, duration)

    # the stage on this device: it says which timer it used, and timed real work
    model = compressed_student(tmp_path, tiny_llama, "budgeted-lora", "compressed")
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(model), "--baseline", str(tiny_llama), "--device", device,
                                      "--prefill-tokens", "16", "--decode-batch", "1,2", "--decode-context", "4",
                                      "--decode-steps", "2", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    bench = json.loads((out / "result.json").read_text())
    assert bench["protocol"]["timer"] == ("cuda events" if device == "cuda" else "perf_counter")
    assert bench["machine"]["device"] == device
    if device == "cuda":
        assert bench["machine"]["device_name"] == torch.cuda.get_device_name()
    assert bench["module_runs"] and bench["end_to_end_runs"]
    assert all(r["dense_s"] > 0 and r["compressed_s"] > 0 for r in bench["module_runs"])
    assert all(r["tokens_per_s"] > 0 for r in bench["end_to_end_runs"])


# -- DDP: two processes against one ----------------------------------------------------------------------

# On the CPU both runs compute in float32, and differ only in the order the gradient is summed: a few
# float32 ulps. On CUDA the steps run under bf16 autocast: a last-bit float32 difference in a LoRA factor can
# flip the bf16 rounding of an activation (2⁻⁸ relative), and Adam's first steps move each weight by about
# the learning rate (3e-4) whatever the gradient's size, so a flipped sign moves it by twice that.
DDP_TOLERANCE = {"cpu": {"weights": (1e-4, 1e-6), "loss": 1e-5, "grad_norm": 1e-4},
                 "cuda": {"weights": (1e-2, 1e-3), "loss": 1e-3, "grad_norm": 1e-2}}


@pytest.mark.parametrize("device", SLOW_DEVICES)
def test_two_ddp_processes_equal_one_with_the_same_global_batch(device, setting, tmp_path):
    """`torchrun --nproc-per-node 2` (gloo on the CPU, NCCL on two GPUs) against one process with two
    micro-batches per step: the same weights, log and global gradient norm."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL DDP needs two GPUs; this machine has {torch.cuda.device_count()}")
    tolerance = DDP_TOLERANCE[device]
    common = ["--teacher", str(setting["teacher"]), "--student", str(setting["student"]), "--data",
              str(setting["data"]), "--method", "budgeted-lora", "--budget", "0.5", "--tokens", str(6 * 128),
              "--rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--save-every", "0", "--device", device]
    one = subprocess.run([sys.executable, "-m", "bltool", "distill", *common, "--batch-size", "2",
                          "--grad-accum", "2", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=_env())
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(29500 + os.getpid() % 1000), "-m", "bltool", "distill", *common, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=_env())
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "two")  # only rank 0 prints the path
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    rtol, atol = tolerance["weights"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=rtol, atol=atol), key
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["tokens"] for r in log_one] == [r["tokens"] for r in log_two]
    assert [r["loss"] for r in log_one] == pytest.approx([r["loss"] for r in log_two], rel=tolerance["loss"])
    # the logged gradient norm is the global gradient's (the one clipping uses), not world-size times it;
    # the two runs sum the same gradient in another order, hence the tolerance
    norms_one, norms_two = [r["grad_norm"] for r in log_one], [r["grad_norm"] for r in log_two]
    assert all(n > 0 for n in norms_one)
    assert norms_two == pytest.approx(norms_one, rel=tolerance["grad_norm"])


# -- vLLM: a compressed student served token for token like transformers ---------------------------------

PROMPTS = [[1, 5, 9, 2, 7, 3, 11, 4], [100, 7, 8, 9, 200, 201, 17, 3, 250, 12, 4, 88]]
MAX_TOKENS = 16


def _vllm_on(device: str) -> str:
    """The Python of a vLLM whose platform is `device`, or a skip saying why there is none. The CPU case is
    the vLLM environment `make test` requires (`make vllm-install`); the CUDA case needs BLTOOL_VLLM_PYTHON
    to name a Python with vLLM's CUDA build, and skips without one."""
    if device == "cpu":
        python = vllm_python()
    else:
        python = os.environ.get("BLTOOL_VLLM_PYTHON")
        if not (python and Path(python).exists()):
            pytest.skip("vLLM's CUDA build: set BLTOOL_VLLM_PYTHON to a Python that has it (pip install vllm)")
    probe = subprocess.run([python, "-c", "from vllm.platforms import current_platform as p; print(p.device_type)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        if device == "cpu":
            pytest.fail(f"vLLM at {python} does not import: {why}")
        pytest.skip(f"vLLM's CUDA build is not importable from {python}: {why}")
    platform = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "none"
    if platform != device:
        pytest.skip(f"the vLLM at {python} runs on {platform!r}, not {device!r}")
    return python


@pytest.mark.parametrize("device", SLOW_DEVICES)
def test_vllm_serves_a_compressed_student_token_for_token_like_transformers(device, tokenizer, tmp_path):
    """Greedy decoding of a budgeted student with all three module forms (dropped, SVD, kept), served in float32
    by bltool's plugin in vLLM on `device`, gives transformers' tokens on the CPU, every one of them."""
    python = _vllm_on(device)
    teacher = vllm_teacher(tmp_path / "llama", tokenizer, "llama")
    student = compressed_student(tmp_path, teacher, "budgeted-lora", "student")
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"models": [{"path": str(student), "eager": True}], "prompts": PROMPTS,
                                "max_tokens": MAX_TOKENS}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    served = subprocess.run([python, str(HERE / "vllm_generate.py"), str(spec), str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert served.returncode == 0, served.stderr[-4000:]
    got = json.loads(out.read_text())[str(student)]
    config = json.loads((student / "config.json").read_text())
    assert got["model_class"] == f"bltool.serve.vllm_models.{config['architectures'][0]}"  # the plugin's class
    model = load_model(str(student))
    want = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            generated = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
            want.append(generated[0, len(prompt):].tolist())
    assert got["tokens"] == want
