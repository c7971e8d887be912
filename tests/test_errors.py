"""Bad inputs fail early with a specific error that names the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import build_llama, make_batch
from torch import nn

from hfinfluence import (
    ConfigError,
    EmptyInputError,
    Influence,
    InfluenceConfig,
    NonFiniteError,
    NotFittedError,
    NoTrackableModuleError,
    SharedModuleError,
    UnsupportedModuleError,
)


class EmbeddingOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Embedding(10, 4)])


def test_model_without_trackable_module():
    with pytest.raises(NoTrackableModuleError, match="no trainable nn.Linear"):
        Influence(EmbeddingOnly())


def test_frozen_model_has_nothing_to_track(llama):
    llama.requires_grad_(False)
    with pytest.raises(NoTrackableModuleError):
        Influence(llama)


def test_empty_batch_list(llama):
    engine = Influence(llama, InfluenceConfig(sketch_dims=4))
    with pytest.raises(EmptyInputError, match="`batches` is empty"):
        engine.fit([])
    engine.fit([make_batch(4)])
    with pytest.raises(EmptyInputError, match="`target batches` is empty"):
        engine.set_target(iter([]))


def test_batch_whose_labels_are_all_ignored(llama):
    batch = make_batch(3)
    batch["labels"][:] = -100
    with pytest.raises(EmptyInputError, match="Every label in this batch is -100"):
        Influence(llama).fit([batch])


def test_unknown_module_pattern(llama):
    with pytest.raises(ConfigError, match=r"pattern '\*\.attention\.\*' matches no module"):
        Influence(llama, InfluenceConfig(modules=["*.mlp.*", "*.attention.*"]))


def test_unsupported_module_named(llama):
    with pytest.raises(UnsupportedModuleError, match=r"model.layers.0.input_layernorm \(LlamaRMSNorm\)"):
        Influence(llama, InfluenceConfig(modules=["model.layers.0.*"]))


def test_tied_head_refused_unless_allowed():
    model = build_llama(tie_word_embeddings=True)
    with pytest.raises(SharedModuleError, match="lm_head.*model.embed_tokens.weight"):
        Influence(model, InfluenceConfig(modules=["lm_head"]))
    engine = Influence(model, InfluenceConfig(modules=["lm_head"], allow_shared=True, sketch_dims=4))
    assert engine.fit([make_batch(4)]).sizing()[0].module == "lm_head"


def test_module_called_twice_is_refused(llama):
    mlp = llama.model.layers[0].mlp
    original = mlp.forward
    mlp.forward = lambda x: original(x) + 0.0 * original(x)
    with pytest.raises(SharedModuleError, match="called more than once"):
        Influence(llama).fit([make_batch(4)])


def test_non_finite_factor_names_the_module(llama):
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    # the NaN reaches every layer through the backward pass; the first one checked is named
    with pytest.raises(NonFiniteError, match=r"of module model\.layers\.0\.self_attn\.q_proj has \d+ non-finite"):
        Influence(llama).fit([make_batch(4)])


def test_score_before_target(llama):
    engine = Influence(llama)
    with pytest.raises(NotFittedError, match="fit"):
        engine.set_target([make_batch(2)])
    with pytest.raises(NotFittedError, match="set_target"):
        engine.fit([make_batch(4)]).score(make_batch(2))


@pytest.mark.parametrize(
    "field, value",
    [
        ("sketch", "sparse"),
        ("curvature", "hessian"),
        ("damping", -1.0),
        ("damping", "big"),
        ("sketch_dims", 0),
        ("sketch_dims", (3, 4, 5)),
        ("epsilon", 0.0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        InfluenceConfig(**{field: value})
