"""fused_xent.integrations.transformers against the models' own losses.

Tiny random-init models built from configs (no network), in float64. Two references:
- the model's own ``model(..., labels=...).loss``: transformers' ``ForCausalLMLoss`` casts the
  logits to float32 first, so it agrees with the fused float64 loss to float32 rounding
  (``RTOL_OWN``);
- ``F.cross_entropy`` in float64 on the model's own logits (``model(...).logits``, shifted as
  transformers shifts): value and every parameter gradient to float64 rounding (``RTOL_64``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fused_xent.integrations.transformers import (  # noqa: E402
    causal_lm_loss,
    patch_model,
    read_head,
    unpatch_model,
)

V, D, B, T = 97, 32, 3, 11
RTOL_64 = 1e-10  # float64 GEMMs in a different order: ~1e-15 per element, far below this
RTOL_OWN = 2e-6  # the model's own loss rounds the logits to float32 (eps 6e-8) before the loss

_COMMON = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=0.3),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    ),
    "phi": lambda: transformers.PhiConfig(**_COMMON, resid_pdrop=0.0, embd_pdrop=0.0),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "cohere": lambda: transformers.CohereConfig(**_COMMON, logit_scale=3.0),
    "granite": lambda: transformers.GraniteConfig(**_COMMON, logits_scaling=0.25),
    # its forward calls model.decoder directly (the base model never runs); its loss is ForCausalLMLoss
    "opt": lambda: transformers.OPTConfig(
        vocab_size=V,
        hidden_size=D,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=D,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    # base_model is the model itself (its base_model_prefix names no attribute): the hook goes on .model
    "llama4_text": lambda: transformers.Llama4TextConfig(
        **_COMMON, intermediate_size_mlp=48, head_dim=8, num_local_experts=2
    ),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).double()
    with torch.no_grad():  # larger logits than the 0.02 init, so softcap and scale matter
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias.normal_(0.0, 0.5)
    return model


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, 5] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0  # padding
    labels[1, -3:] = -100
    return ids, labels, mask


def reference_loss(model, ids, labels, mask, num_items_in_batch=None):
    """float64 cross-entropy on the model's own logits, shifted as transformers shifts."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_rel_close(actual, expected, rtol, what="", floor=1e-300):
    """``|actual - expected| / max(|expected|, floor) <= rtol``; ``floor`` for a gradient that
    is zero in exact arithmetic (OPT's attention key bias: softmax ignores a shift shared by
    every key), whose computed values are rounding noise of the whole gradient's size."""
    err = (actual - expected).norm() / expected.norm().clamp_min(floor)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("family", list(CONFIGS))
def test_loss_and_every_gradient_equal_the_models_own(family):
    model = tiny_model(family).eval()
    ids, labels, mask = batch()
    head = read_head(model)
    assert (head.bias is not None) == (family == "phi")
    assert (head.softcap is not None) == (family == "gemma2")

    loss = causal_lm_loss(model, ids, labels, attention_mask=mask)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref = reference_loss(model, ids, labels, mask)
    assert loss.dtype == torch.float64
    assert_rel_close(loss, ref, RTOL_64, "loss vs float64 reference")
    assert_rel_close(loss, own.double(), RTOL_OWN, "loss vs model(..., labels).loss")

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g_own = grads(model, model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    g_refs = grads(model, ref)
    whole = max(g.norm() for g in g_refs if g is not None)
    for name, g, g_ref, g_o in zip(names, grads(model, loss), g_refs, g_own, strict=True):
        assert g is not None and g.abs().sum() > 0, name
        assert_rel_close(g, g_ref, RTOL_64, name, floor=1e-6 * whole)
        # float32 logit gradients
        assert_rel_close(g, g_o, 50 * RTOL_OWN, f"{name} vs the own loss's gradient", floor=1e-6 * whole)


def test_num_items_in_batch_and_shift_labels():
    model = tiny_model("llama").eval()
    ids, labels, mask = batch()
    n = torch.tensor(40)  # tokens over an accumulated batch: more than the 26 kept here
    loss = causal_lm_loss(model, ids, labels, attention_mask=mask, num_items_in_batch=n)
    own = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    assert_rel_close(loss, reference_loss(model, ids, labels, mask, n), RTOL_64)
    assert_rel_close(loss, own.double(), RTOL_OWN)
    assert_rel_close(causal_lm_loss(model, ids, labels, attention_mask=mask, num_items_in_batch=40), loss, 1e-15)

    shift = torch.randint(0, V, (B, T))
    shift[:, -2:] = -100
    loss = causal_lm_loss(model, ids, None, attention_mask=mask, shift_labels=shift)
    own = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    assert_rel_close(loss, own.double(), RTOL_OWN)


def test_autocast_bf16_matches_the_models_own_loss():
    """A float32 model under CPU bf16 autocast (what Trainer(bf16=True) does): the head runs in
    bf16 in both; the losses agree to bf16 rounding of the logits (eps 7.8e-3)."""
    model = tiny_model("phi").float().eval()
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, ids, labels, attention_mask=mask)
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert loss.dtype == torch.float32
    assert_rel_close(loss, own, 1e-2)
    g, g_own = grads(model, loss), grads(model, own)
    assert_rel_close(g[-1], g_own[-1], 3e-2, "head bias")


def test_moe_router_aux_loss_is_added():
    config = transformers.MixtralConfig(
        **_COMMON, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").double().eval()
    ids, labels, mask = batch()
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert own.aux_loss is not None
    loss = causal_lm_loss(model, ids, labels, attention_mask=mask)
    assert_rel_close(loss, own.loss.double(), RTOL_OWN)


def test_no_logits_are_formed_and_forward_only_evaluation():
    model = tiny_model("gemma2").eval()
    ids, labels, mask = batch()
    causal_lm_loss(model, ids, labels, attention_mask=mask)  # the first call checks one position per row
    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        loss = causal_lm_loss(model, ids, labels, attention_mask=mask)
        ref = reference_loss(model, ids, labels, mask)
    assert shapes[0] == (B, 0, V)
    assert not loss.requires_grad
    assert_rel_close(loss.exp(), ref.exp(), RTOL_64, "perplexity")


def test_patched_model_outputs():
    model = tiny_model("gpt2").eval()
    plain = copy.deepcopy(model)
    ids, labels, mask = batch()
    assert patch_model(model) is model
    patch_model(model)  # twice is a no-op

    out, ref = model(input_ids=ids, attention_mask=mask), plain(input_ids=ids, attention_mask=mask)
    assert type(out) is type(ref) and out.keys() == ref.keys() and out.loss is None
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)

    out = model(ids, attention_mask=mask, labels=labels)
    ref = plain(ids, attention_mask=mask, labels=labels)
    assert type(out) is type(ref) and out.logits is None and "logits" not in out
    assert out.past_key_values is not None
    assert_rel_close(out.loss, ref.loss.double(), RTOL_OWN)

    tup = model(ids, None, mask, labels=labels, return_dict=False)
    ref_tup = plain(ids, None, mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.loss)
    # the model's own layout: the logits' slot kept (None), every later field at its index
    assert len(tup) == len(ref_tup) and tup[1] is None and type(tup[2]) is type(ref_tup[2])

    unpatch_model(model)
    assert model(input_ids=ids, labels=labels).logits.shape == (B, T, V)


def test_hidden_states_in_another_dtype_than_the_head():
    """A bf16 Mamba's base model returns fp32 hidden states (``residual_in_fp32``) and its forward
    casts them to the head's dtype: the head check and the loss take the head's dtype too."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, state_size=4)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    ids, labels, _ = batch()
    own = model(input_ids=ids, labels=labels).loss
    assert_rel_close(causal_lm_loss(model, ids, labels).double(), own.double(), 1e-2)  # bf16 logits in its own


def test_bad_models_raise_clear_errors():
    model = tiny_model("llama").eval()
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match="needs labels"):
        causal_lm_loss(model, ids)
    with pytest.raises(ValueError, match="logits_to_keep cannot be combined"):
        causal_lm_loss(model, ids, labels, logits_to_keep=1)
    with pytest.raises(ValueError, match=r"labels have shape \(3, 10\)"):
        causal_lm_loss(model, ids, labels[:, :-1])
    with pytest.raises(ValueError, match="cannot read the LM head of LlamaModel"):
        causal_lm_loss(model.model, ids, labels)

    # a forward that calls its decoder directly with an unshifted loss of its own: refused, not guessed
    bart = transformers.AutoModelForCausalLM.from_config(
        transformers.BartConfig(vocab_size=V, d_model=D, decoder_layers=2, encoder_layers=2, decoder_ffn_dim=48,
                                encoder_ffn_dim=48, decoder_attention_heads=4, encoder_attention_heads=4,
                                max_position_embeddings=64)
    )  # fmt: skip
    assert type(bart).__name__ == "BartForCausalLM"
    with pytest.raises(ValueError, match="BartForCausalLM.forward calls its decoder directly"):
        causal_lm_loss(bart, ids, labels)

    model.config.logit_scale = 2.0  # a field this Llama's forward ignores: the first call's head check catches it
    with pytest.raises(ValueError, match="LlamaForCausalLM's logits differ"):
        causal_lm_loss(model, ids, labels)


def test_trainer_step_with_gradient_accumulation(tmp_path):
    """One optimizer step over two accumulated micro-batches (Trainer passes num_items_in_batch):
    the patched model's parameters and evaluation loss equal those of the unpatched model."""
    ids, labels, mask = batch()
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]
    rows = rows + rows[:1]

    def train(model):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_drop_last=False,
            seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
        trainer.train()
        return trainer.evaluate()["eval_loss"]

    plain = tiny_model("qwen2")
    fused = patch_model(copy.deepcopy(plain))
    eval_plain, eval_fused = train(plain), train(fused)
    moved = 0.0
    for (name, p), q, p0 in zip(
        fused.named_parameters(), plain.parameters(), tiny_model("qwen2").parameters(), strict=True
    ):
        assert_rel_close(p - p0, q - p0, 50 * RTOL_OWN, name)
        moved += (p - p0).norm().item()
    assert moved > 0
    assert abs(eval_fused - eval_plain) <= RTOL_OWN * abs(eval_plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])
def test_bf16_on_gpu_within_twice_torchs_error(family):
    """bf16 model on the GPU (Triton kernels): loss and head / hidden gradients vs an fp32
    reference no worse than twice the error of the model's own bf16 loss."""
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.vocab_size, config.hidden_size, config.intermediate_size = 32000, 256, 512
    model32 = transformers.AutoModelForCausalLM.from_config(config).cuda().eval()
    model16 = copy.deepcopy(model32).bfloat16()
    ids = torch.randint(0, 32000, (4, 256), device="cuda")

    def run(model, fused):
        model.zero_grad()
        loss = causal_lm_loss(model, ids, ids) if fused else model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.float(), model.get_output_embeddings().weight.grad.float()

    loss_ref, gw_ref = run(model32, fused=False)
    loss_own, gw_own = run(model16, fused=False)
    loss, gw = run(model16, fused=True)
    assert abs(loss - loss_ref) <= 2 * abs(loss_own - loss_ref) + 1e-3 * abs(loss_ref)
    err, err_own = (gw - gw_ref).norm() / gw_ref.norm(), (gw_own - gw_ref).norm() / gw_ref.norm()
    assert err <= 2 * err_own, f"head gradient error {err:.3g} vs torch bf16 {err_own:.3g}"
