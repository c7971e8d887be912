"""Hook-captured sketched gradients against an autograd per-example loop (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, RTOL, build_llama, make_batch
from peft import LoraConfig, get_peft_model

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.capture import find_tracked_modules


def reference_gradients(model, batch, tracked) -> dict[str, torch.Tensor]:
    """G_i for every example and layer, [n, d_out, d_in (+1 bias column)], one backward per example."""
    out = {name: [] for name in tracked}
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits[0, :-1]
        # summed next-token loss; written out here (HF's own loss upcasts to float32 only)
        loss = torch.nn.functional.cross_entropy(logits, row["labels"][0, 1:], ignore_index=-100, reduction="sum")
        params = []
        for info in tracked.values():
            params.append(info.module.weight)
            if info.has_bias:
                params.append(info.module.bias)
        grads = iter(torch.autograd.grad(loss, params))
        for name, info in tracked.items():
            weight_grad = next(grads)
            weight_grad = weight_grad.T if info.kind == "conv1d" else weight_grad
            if info.has_bias:
                weight_grad = torch.cat([weight_grad, next(grads).unsqueeze(1)], dim=1)
            out[name].append(weight_grad)
    return {name: torch.stack(grads) for name, grads in out.items()}


def check_against_loop(model, sketch: str, dims=(5, 7)):
    config = InfluenceConfig(sketch=sketch, sketch_dims=dims, curvature="identity", seed=3)
    engine = Influence(model, config)
    batch = make_batch(4, 12, seed=1)
    sketched = engine.sketch_gradients(batch)
    reference = reference_gradients(model, batch, engine.tracked)
    assert set(sketched) == set(reference)
    for name, layer in engine.layers.items():
        expected = reference[name]
        if layer.sketch_e is not None:
            expected = layer.sketch_e @ expected
        if layer.sketch_a is not None:
            expected = expected @ layer.sketch_a.T
        torch.testing.assert_close(sketched[name], expected, rtol=RTOL, atol=ATOL)
        assert expected.abs().max() > 0, f"{name}: zero gradient makes the check vacuous"


@pytest.mark.parametrize("sketch", ["gaussian", "rademacher", "countsketch", "none"])
def test_linear_layers_match_autograd_loop(llama, sketch):
    check_against_loop(llama, sketch)


def test_conv1d_layers_with_bias_match_autograd_loop(gpt2):
    tracked = find_tracked_modules(gpt2)
    assert {info.kind for info in tracked.values()} == {"conv1d"} and all(i.has_bias for i in tracked.values())
    check_against_loop(gpt2, "gaussian")


def test_peft_lora_layers_match_autograd_loop():
    model = get_peft_model(build_llama(), LoraConfig(r=3, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make every lora_A gradient vanish
            torch.nn.init.normal_(param, std=0.5)
    tracked = find_tracked_modules(model)
    assert tracked and all(".lora_A." in n or ".lora_B." in n for n in tracked)
    assert len(tracked) == 2 * 2 * 2  # A and B, q and v, two layers
    check_against_loop(model, "gaussian", dims=(2, 3))


def test_default_selection_skips_embeddings_and_head(llama):
    names = list(find_tracked_modules(llama))
    assert len(names) == 14
    assert not any("embed" in n or "lm_head" in n for n in names)
