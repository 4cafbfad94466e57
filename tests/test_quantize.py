"""quantize: exact save/load round trips, sizes that shrink, calibration, unsupported methods, merge order,
and the stage on the smoke chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import copy_chain, run_stage, save_tiny_config_model, save_tiny_model
from pipeline import quantization as Q
from pipeline.schema import QAT_METHODS, QUANT_METHODS, ConfigError


def probe_ids() -> torch.Tensor:
    return torch.randint(10, 90, (3, 24), generator=torch.Generator().manual_seed(0))


def test_every_schema_method_is_described_here():
    assert set(Q.METHODS) == set(QUANT_METHODS)
    assert set(Q.INTX) == set(QAT_METHODS)                          # the QAT-capable ones: config and code agree


def save_gqa_llama(folder: Path) -> Path:
    """A tiny Llama with one key-value head: its key and value projections (64 -> 16) are narrower than the
    NF4 CPU kernel's groups of 32 output rows, as small heads, adapters and classifier heads of real models
    are; every other projection fits the kernel."""
    return save_tiny_config_model(folder, "LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                  tie_word_embeddings=True)


NARROW = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")}


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_weight_only_asym", "bnb_nf4"])
def test_saved_methods_load_back_exactly_and_shrink_the_linear_weights(tmp_path, method):
    from pipeline.models import load_causal_lm

    source = save_gqa_llama(tmp_path / "fp32")
    fp32 = load_causal_lm(source).eval()
    quantized = Q.quantize_model(method, source)
    kept = set(Q.unfit_layers(method, fp32))
    assert kept == (NARROW if method == "bnb_nf4" else set())
    layers = Q.quantized_linear_modules(quantized)
    for fqn in kept:                                                # left in full precision, untouched
        assert full_precision(layers[fqn]) and torch.equal(layers[fqn].weight, fp32.get_submodule(fqn).weight)
    assert not any(full_precision(m) for fqn, m in layers.items() if fqn not in kept)
    quantized.save_pretrained(tmp_path / method, safe_serialization=True)
    assert not list((tmp_path / method).glob("*.bin")), "weights must be safetensors, never pickle"
    reloaded = load_causal_lm(tmp_path / method).eval()
    with torch.no_grad():                                           # eval, no grad: the CPU kernels' inference path
        before, after, reference = (m(input_ids=probe_ids()).logits for m in (quantized, reloaded, fp32))
    assert torch.equal(before, after)                               # the round trip is exact
    assert 0 < (before - reference).abs().max() < 1.0               # quantized: close to fp32, not equal
    fp32_layers = Q.quantized_linear_modules(fp32)
    ratio = (sum(Q.module_weight_bytes(m) for fqn, m in layers.items() if fqn not in kept)
             / sum(Q.module_weight_bytes(m) for fqn, m in fp32_layers.items() if fqn not in kept))
    assert ratio <= (0.2 if method == "bnb_nf4" else 0.4), ratio
    assert Q.folder_bytes(tmp_path / method) < Q.folder_bytes(source)


def full_precision(module: torch.nn.Module) -> bool:
    """A plain fp32 linear layer: neither swapped for a library's module nor holding a quantized tensor."""
    return (type(module) is torch.nn.Linear and type(module.weight.data) is torch.Tensor
            and module.weight.dtype == torch.float32)


def test_the_nf4_kernel_rule_by_hand():
    assert Q.nf4_kernel_fits(64, 32) is None and Q.nf4_kernel_fits(128, 96) is None
    assert "groups of 32" in Q.nf4_kernel_fits(64, 16)              # 16 output rows: half a group
    assert "blocks of 64" in Q.nf4_kernel_fits(32, 32)              # 32 inputs: half a block
    assert Q.nf4_kernel_fits(96, 128) is not None                   # one and a half blocks


def test_only_a_missing_kernel_is_unsupported_any_other_error_is_a_failure(monkeypatch):
    def raising(err):
        def apply(*args, **kwargs):
            raise err
        return apply

    for gap in (ImportError("Requires mslk >= 1.0.0"), NotImplementedError("int4 matmul"),
                RuntimeError("'_weight_int4pack_mm_cpu' not implemented for 'Float'")):
        monkeypatch.setattr(Q, "_apply_in_place", raising(gap))
        with pytest.raises(Q.UnsupportedMethod, match="does not run on"):
            Q.check_supported("int4_weight_only")
    for bug in (RuntimeError("shape '[32, 0]' is invalid for input of size 16"), AssertionError("N must be divisible"),
                ValueError("bad scale")):
        monkeypatch.setattr(Q, "_apply_in_place", raising(bug))
        with pytest.raises(type(bug)) as raised:
            Q.check_supported("bnb_nf4")
        assert type(raised.value) is type(bug) and not isinstance(raised.value, Q.UnsupportedMethod)


def test_every_method_runs_or_is_unsupported_none_fails_on_a_model_with_narrow_layers(tmp_path):
    """Each method quantizes the tiny model and runs its forward pass in inference mode (where bitsandbytes'
    AVX-512 kernel used to fail on narrow layers); only a capability gap may excuse a method."""
    from pipeline.models import load_causal_lm

    source = save_gqa_llama(tmp_path / "fp32")
    fp32 = load_causal_lm(source).eval()
    observer = Q.RangeObserver(fp32)
    with torch.no_grad():
        reference = fp32(input_ids=probe_ids()).logits
    observer.remove()
    unsupported = []
    for name, method in Q.METHODS.items():
        try:
            Q.check_supported(name)
        except Q.UnsupportedMethod:
            unsupported.append(name)
            continue
        model = Q.quantize_model(name, source, observer.ranges if method.calibrated else None)
        with torch.no_grad():
            logits = model(input_ids=probe_ids()).logits
        assert 0 < (logits - reference).abs().max() < 1.0, name
    assert set(unsupported) <= {"int4_weight_only"}, unsupported     # no kernel for it on a CPU without mslk


@pytest.mark.parametrize("name", sorted(Q.INTX))
def test_qat_fake_quantization_is_ptq_before_training_and_converts_exactly_after(tmp_path, name):
    """The fake-quantized forward pass has the quantized model's numerics: untrained, it gives PTQ's logits
    exactly; after a few optimizer steps, convert turns it into intx tensors (codes within the bit width) whose
    logits equal the fake-quantized ones exactly, and differ from PTQ's (the fine-tune moved the weights)."""
    from pipeline.models import load_causal_lm

    source = save_gqa_llama(tmp_path / "fp32")
    ids = probe_ids()
    ptq = Q.quantize_model(name, source)
    qat = Q.prepare_qat(name, load_causal_lm(source, dtype=torch.float32))
    with torch.no_grad():
        ptq_logits = ptq(input_ids=ids).logits
        fp32_logits = load_causal_lm(source).eval()(input_ids=ids).logits
        assert torch.equal(qat.eval()(input_ids=ids).logits, ptq_logits)
    assert not torch.equal(ptq_logits, fp32_logits)                 # the rounding is there
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-2)
    for _ in range(3):
        qat.train()(input_ids=ids, labels=ids).loss.backward()        # gradients pass the rounding (straight through)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        fake = qat.eval()(input_ids=ids).logits
        Q.convert_qat(name, qat)
        converted = qat(input_ids=ids).logits
    assert torch.equal(converted, fake)
    assert not torch.equal(converted, ptq_logits)
    weight = qat.model.layers[0].mlp.up_proj.weight
    bits = Q.INTX[name][0]
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert -(2 ** (bits - 1)) <= int(weight.qdata.min()) and int(weight.qdata.max()) <= 2 ** (bits - 1) - 1


def test_intx_methods_leave_gpt2_conv1d_layers_in_fp32_and_say_why(tmp_path):
    from pipeline.models import load_causal_lm

    source = save_tiny_model(tmp_path / "gpt2", "gpt2")
    model = load_causal_lm(source)
    kept = Q.unfit_layers("intx_w4a8", model)
    assert kept and all("Conv1D is not a torch.nn.Linear" in why for why in kept.values())
    with torch.no_grad():
        before = model(input_ids=probe_ids()).logits
        after = Q.prepare_qat("intx_w4a8", model)(input_ids=probe_ids()).logits
    assert torch.equal(before, after)                               # nothing was fake-quantized


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_halves_the_bytes_and_stays_close(tmp_path, name, dtype):
    from pipeline.models import load_causal_lm

    source = save_gqa_llama(tmp_path / "fp32")
    fp32 = load_causal_lm(source).eval()
    half = Q.quantize_model(name, source)
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert Q.model_bytes(half) == {k: v // 2 for k, v in Q.model_bytes(fp32).items()}
    with torch.no_grad():
        diff = (half(input_ids=probe_ids()).logits.float() - fp32(input_ids=probe_ids()).logits).abs().max()
    assert 0 < diff < 0.1


def test_sizes_by_hand_for_int8_weight_only(tmp_path):
    """A 32x32 int8 weight with one fp32 scale and zero point per row: 1024 + 32 * 4 * 2 bytes."""
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))
    fp32 = Q.model_bytes(layer)
    assert fp32 == {"memory": 32 * 32 * 4, "linear": 32 * 32 * 4}
    quantized = Q._apply_in_place("int8_weight_only", layer, {})
    weight = quantized[0].weight
    names, _ = weight.__tensor_flatten__()
    expected = sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)
    assert Q.model_bytes(quantized)["linear"] == expected and 1024 <= expected <= 1024 + 32 * 8


def test_dynamic_int8_runs_in_process_and_is_never_a_saved_method(tmp_path):
    from omegaconf import OmegaConf

    from stages.quantize import check

    source = save_tiny_model(tmp_path / "fp32", "llama")
    model = Q.quantize_model("int8_dynamic", source)
    with torch.no_grad():
        model(input_ids=probe_ids())
    assert Q.model_bytes(model)["linear"] < 0.35 * 4 * sum(m.in_features * m.out_features
                                                          for m in Q.quantized_linear_modules(model).values()
                                                          if hasattr(m, "in_features"))
    cfg = OmegaConf.create({"quantize": {"method": "int8_dynamic"}})
    with pytest.raises(ConfigError, match="quantize.method.*cannot be saved"):
        check(cfg)


def test_unsupported_int4_gets_a_clear_message_not_a_crash():
    from omegaconf import OmegaConf

    from stages.quantize import check

    try:
        Q.check_supported("int4_weight_only")
    except Q.UnsupportedMethod as err:
        assert "int4_weight_only" in str(err) and "does not run on" in str(err)
        with pytest.raises(ConfigError, match="quantize.method.*int4_weight_only"):
            check(OmegaConf.create({"quantize": {"method": "int4_weight_only"}}))
    else:  # hardware with int4 kernels: then it must really run
        layer = Q._apply_in_place("int4_weight_only", torch.nn.Sequential(torch.nn.Linear(256, 256)), {})
        layer(torch.randn(2, 256))


def test_static_scales_by_hand_and_calibration_through_predict(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.models import load_causal_lm, load_tokenizer
    from stages.quantize import calibrate

    sym = Q.static_config(torch.tensor(3.0), torch.tensor(-1.0), symmetric=True)
    assert sym.act_quant_scale.item() == pytest.approx(3 / 127) and sym.act_quant_zero_point is None
    asym = Q.static_config(torch.tensor(3.0), torch.tensor(-1.0), symmetric=False)
    assert asym.act_quant_scale.item() == pytest.approx(4 / 255)
    assert asym.act_quant_zero_point.item() == -64                  # round(-128 + 1 / (4/255)) = -64
    assert asym.act_quant_scale.shape == (1, 1, 1)                  # the activation's rank

    source = save_tiny_model(tmp_path / "fp32", "llama")
    model, tok = load_causal_lm(source).eval(), load_tokenizer(source)
    rows = [{"messages": [{"role": "user", "content": f"What number comes after {n}?"},
                          {"role": "assistant", "content": str(n + 1)}]} for n in range(12)]
    cfg = OmegaConf.create({"quantize": {"batch_size": 5}, "trainer": {"accelerator": "cpu", "precision": "32-true"}})
    ranges = calibrate(model, tok, rows, cfg)
    assert set(ranges) == set(Q.linear_modules(model))              # every linear layer observed
    assert all(high >= low and ndim == 3 for high, low, ndim in ranges.values())
    with torch.no_grad():
        reference = model(input_ids=probe_ids()).logits
        for method in ("int8_static", "int8_static_asym"):
            quantized = Q.quantize_model(method, source, ranges)
            assert 0 < (quantized(input_ids=probe_ids()).logits - reference).abs().max() < 1.0


def test_static_int8_takes_a_layer_fed_2d_activations():
    """Some decoders flatten tokens before their MLP (issue 19: a 3-D scale failed on them): the observer
    records each input's rank and the scale takes it."""
    from torchao.quantization import FqnToConfig, quantize_

    class Flattening(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

        def forward(self, x):  # (batch, tokens, 64) -> 2-D before the MLP -> back
            b, t, d = x.shape
            return self.down(torch.relu(self.up(x.reshape(b * t, d)))).reshape(b, t, d)

    torch.manual_seed(0)
    model, x = Flattening().eval(), torch.randn(2, 5, 64)
    observer = Q.RangeObserver(model)
    with torch.no_grad():
        reference = model(x)
    observer.remove()
    assert {fqn: r[2] for fqn, r in observer.ranges.items()} == {"up": 2, "down": 2}
    config = {fqn: Q.static_config(*observer.ranges[fqn]) for fqn in ("up", "down")}
    assert config["up"].act_quant_scale.shape == (1, 1)
    quantize_(model, FqnToConfig(config), filter_fn=None)
    with torch.no_grad():
        error = (model(x) - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05


def test_merge_comes_before_quantization(tmp_path):
    """The adapter is merged into fp32 weights, then quantized: the int8 weights dequantize to the merged
    weights (within one quantization step), not to the base's."""
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_causal_lm

    base_dir = save_tiny_model(tmp_path / "base", "llama")
    peft_model = get_peft_model(load_causal_lm(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)                       # a real update (lora_B starts at zero)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = Q.merge_adapter(base_dir, tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    quantized = Q.quantize_model("int8_weight_only", Q.merged_source(tmp_path / "merged"))
    base = load_causal_lm(base_dir)
    layer = "model.layers.0.self_attn.q_proj"
    want = merged.get_submodule(layer).weight.detach()
    got = quantized.get_submodule(layer).weight.dequantize()
    step = want.abs().amax(-1, keepdim=True) / 127
    assert ((got - want).abs() <= step).all()
    assert (want - base.get_submodule(layer).weight).abs().max() > 10 * step.max()


def test_a_prompt_learning_output_has_nothing_to_merge(tmp_path):
    folder = save_tiny_model(tmp_path / "model", "llama")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(Q.UnsupportedMethod, match="nothing|no weights to merge"):
        Q.merged_source(folder)


def test_stage_measures_every_method_saves_one_and_evaluate_reads_it(dpo_chain, tmp_path, monkeypatch):
    from pipeline.models import load_causal_lm

    work = copy_chain(dpo_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    real = Q.quantize_model

    def breaks_asym(name, *args, **kwargs):  # a compared method that fails: reported, and the stage goes on
        if name == "int8_static_asym":
            raise ValueError("scale out of range")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(Q, "quantize_model", breaks_asym)
    results = run_stage("quantize", values={"quantize.compare": ["int8_weight_only", "int8_static", "int8_static_asym",
                                                                 "int8_dynamic", "int4_weight_only", "bf16"]})
    measured = {name: m for name, m in results.items() if "quantize/status" not in m}
    assert {"fp32", "int8_weight_only", "int8_static", "int8_dynamic", "bf16"} <= set(measured)
    assert measured["bf16"]["size/linear_ratio"] == 0.5
    # QAT (the smoke experiment's quantize.qat.methods): its row beside its PTQ row, compared on the same prompts.
    qat, ptq = measured["qat_intx_w2a8"], measured["intx_w2a8"]
    assert qat["size/linear_bytes"] == ptq["size/linear_bytes"]     # the same quantized format
    for key in ("test/accuracy", "test/nll"):
        low, diff, high = (qat[f"{key}_vs_ptq{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert low <= diff <= high
    assert abs(qat["test/accuracy_vs_ptq"] - (qat["test/accuracy"] - ptq["test/accuracy"])) < 1e-3
    assert qat["val/kl_to_fp32"] < qat["val/kl_to_fp32_before"]   # the fine-tune brought it closer to fp32
    assert qat["qat/steps"] == 6
    saved = measured["int8_weight_only"]
    assert saved["size/linear_ratio"] <= 0.4 and saved["size/disk_bytes"] < measured["fp32"]["size/disk_bytes"]
    assert saved["quantize/roundtrip_max_abs_diff"] == 0.0
    for metrics in measured.values():
        assert 0.0 <= metrics["test/accuracy"] <= 1.0 and metrics["test/perplexity"] > 1.0
        assert metrics["speed/forward_ms"] > 0 and metrics["speed/tokens_per_second"] > 0
    report = json.loads(Path("data/quantize/report.json").read_text())
    assert report["failed"] == {"int8_static_asym": "ValueError: scale out of range"}
    assert report["methods"]["qat_intx_w2a8"]["summary"].startswith("quantization-aware training, then int2 weights")
    assert results["int8_static_asym"] == {"quantize/status": "failed"}
    if "int4_weight_only" not in measured:
        assert "int4_weight_only" in report["unsupported"]
        assert results["int4_weight_only"] == {"quantize/status": "unsupported"}
    from pipeline.stage import split_timings

    model, timings = split_timings(json.loads(json.dumps(results)))
    assert json.loads(Path("data/metrics/quantize.json").read_text()) == model
    assert json.loads(Path("data/timings/quantize.json").read_text()) == timings
    model = load_causal_lm("data/quantize")                      # an ordinary from_pretrained
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    evaluated = run_stage("evaluate", values={"evaluate.variants": ["sft", "quantize"], "evaluate.sampled_accuracy": False})
    assert "test/kl_to_sft" in evaluated["quantize"]
    page = Path("data/evaluate/report.html").read_text()
    assert "int8_static_asym: failed: ValueError: scale out of range" in page
    assert "PTQ vs quantization-aware training" in page and "<td>intx_w2a8</td>" in page.split("id='qat'")[1]
    # MLflow's Compare view: each method's and variant's child run carries what defines it as params.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    children = client.search_runs([client.get_experiment_by_name("posttrain").experiment_id],
                                  "tags.`posttrain.kind` = 'variant'")
    params = {(r.data.tags["posttrain.stage"], r.info.run_name): r.data.params for r in children}
    assert params[("quantize", "int8_dynamic")] == {"quantize.method": "int8_dynamic", "quantize.source": "dpo"}
    assert params[("evaluate", "quantize")] == {"variant.source": "quantize", "variant.prompting": "chat",
                                                "variant.shots": "0", "variant.cot": "False"}
    # The parent: a table of every variant's metrics and the headline ones, not a copy of each child's metrics.
    parent = client.get_run(json.loads(Path("data/evaluate/run.json").read_text())["run_id"])
    assert parent.data.metrics["quantize/test/accuracy"] == evaluated["quantize"]["test/accuracy"]
    assert "quantize/test/perplexity" not in parent.data.metrics
    assert "variants.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_the_saved_method_failing_stops_the_stage_and_writes_nothing(dpo_chain, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_chain(dpo_chain, tmp_path / "chain"))

    def broken(name, *args, **kwargs):
        raise ValueError("scale out of range")

    monkeypatch.setattr(Q, "quantize_model", broken)
    with pytest.raises(ValueError, match="scale out of range"):
        run_stage("quantize", values={"quantize.compare": []})
    assert not Path("data/quantize").exists() and not Path("data/metrics/quantize.json").exists()


TIMINGS = ("seconds", "latency", "speed/", "per_second", "_ms")  # the machine's speed, not the model's


def model_metrics(path: Path) -> dict:
    """A metrics file without its timings, flattened to ``method/key``."""
    flat = {}
    for name, metrics in json.loads(path.read_text()).items():
        for key, value in metrics.items():
            if not any(t in key for t in TIMINGS):
                flat[f"{name}/{key}"] = value
    return flat


def test_same_seed_same_quantize_and_evaluate_metrics(dpo_chain, tmp_path, monkeypatch):
    """Twice from the same inputs and config: calibration, every quantized model's accuracy and perplexity,
    greedy and sampled answers, win rates and KL come out identical (timings aside)."""
    runs = []
    for attempt in ("first", "second"):
        monkeypatch.chdir(copy_chain(dpo_chain, tmp_path / attempt))
        run_stage("quantize", values={"quantize.compare": ["int8_weight_only", "int8_static"]})
        run_stage("evaluate", values={"evaluate.variants": ["sft", "dpo", "quantize"]})
        runs.append({name: model_metrics(Path(f"data/metrics/{name}.json")) for name in ("quantize", "evaluate")}
                    | {"generations": Path("data/evaluate/generations.jsonl").read_text()})
    first, second = runs
    assert first["quantize"] and first["evaluate"] and first["generations"]
    assert first == second
