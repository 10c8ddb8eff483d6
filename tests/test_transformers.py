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
import pickle

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
    with pytest.raises(ValueError, match="BartForCausalLM's loss is not self.loss_function's ForCausalLMLoss"):
        causal_lm_loss(bart, ids, labels)

    # a transform of the logits no config field tells: the first call's head check catches it
    handle = model.lm_head.register_forward_hook(lambda m, a, out: 2.0 * out)
    with pytest.raises(ValueError, match="LlamaForCausalLM's logits differ"):
        causal_lm_loss(model, ids, labels)
    handle.remove()


def test_config_fields_count_where_the_forward_uses_them():
    """A logit-scaling or softcap field set in the config is applied where the class's forward
    reads it, with its operator (HyperCLOVAX multiplies by ``logits_scaling``, Granite divides;
    Gemma 3's ForConditionalGeneration keeps a softcap field it does not apply): a field the
    forward ignores is ignored. Before, every field set counted, and the one-time head check
    passed on a fresh model whose logits were too small for a softcap to show."""
    model = tiny_model("llama").eval()
    model.config.logit_scale = 2.0  # Cohere's field; Llama's forward ignores it
    model.config.final_logit_softcapping = 0.3  # Gemma 2's; ditto
    ids, labels, mask = batch()
    head = read_head(model)
    assert head.scale == 1.0 and head.softcap is None
    assert_rel_close(
        causal_lm_loss(model, ids, labels, attention_mask=mask),
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.double(), RTOL_OWN,
    )  # fmt: skip

    from fused_xent.integrations.transformers import _forward_transforms

    class Multiplies(torch.nn.Module):
        def forward(self, h):
            return self.lm_head(h) * self.config.logits_scaling

    class Divides(torch.nn.Module):
        def forward(self, h):
            return self.lm_head(h) / self.config.text_config.logits_scaling

    class UnknownCap(torch.nn.Module):
        def forward(self, h):
            return 5.0 * torch.tanh(self.lm_head(h) / 5.0)

    assert _forward_transforms(Multiplies).scales == {"logits_scaling": True}
    assert _forward_transforms(Divides).scales == {"logits_scaling": False}
    assert _forward_transforms(UnknownCap).unknown_softcap
    cls = type("UnknownCapLM", (type(model),), {"forward": UnknownCap.forward})
    model.__class__ = cls
    with pytest.raises(ValueError, match="applies tanh to its logits through no field"):
        read_head(model)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_a_subclass_calling_super_forward_keeps_its_transforms(family):
    """A user's subclass whose forward calls ``super().forward``: the softcap or scale is read
    from the forwards along the MRO (reading the subclass's source alone dropped Gemma 2's
    softcap: 195.1 where the model's own loss is 30.2 once the logits grew)."""
    base = type(tiny_model(family))

    class Sub(base):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            return super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)

    torch.manual_seed(0)
    model = Sub(CONFIGS[family]()).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 20.0)  # logits far past a softcap
    ids, labels, mask = batch()
    ref = read_head(tiny_model(family))
    assert (read_head(model).scale, read_head(model).softcap) == (ref.scale, ref.softcap)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert_rel_close(causal_lm_loss(model, ids, labels, attention_mask=mask), own.double(), RTOL_OWN)


def test_recurrent_gemma_softcap_at_large_logits():
    """RecurrentGemma caps its logits at ``config.logits_soft_cap``, a field not read before:
    its fresh logits (~0.1) sat far below the cap of 30, so the one-time head check passed and
    the loss lost the cap once the logits grew (49.5 where the model's own gives 28.2)."""
    torch.manual_seed(0)
    config = transformers.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, lru_width=32, attention_window_size=16, head_dim=8,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    ids, labels, _ = batch()
    assert read_head(model).softcap == config.logits_soft_cap
    causal_lm_loss(model, ids, labels, use_cache=False)  # the head check, at small logits (its cache fails here)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(300.0)  # logits well past the cap
    own = model(input_ids=ids, labels=labels, use_cache=False).loss
    assert_rel_close(causal_lm_loss(model, ids, labels, use_cache=False), own.double(), RTOL_OWN)


def test_a_trainable_head_adapter_is_refused():
    """A LoRA adapter on lm_head (peft's ``target_modules=["lm_head"]``): the fused loss takes
    the head's weight, so the adapter would get no gradient (at its zero init the head check
    passes). Any trainable parameter of the head beside its weight and bias is refused."""

    class LoraLinear(torch.nn.Linear):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__(base.in_features, base.out_features, bias=False, dtype=base.weight.dtype)
            self.weight = base.weight
            self.lora_A = torch.nn.Parameter(torch.randn(2, base.in_features, dtype=base.weight.dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, 2, dtype=base.weight.dtype))

        def forward(self, h):
            return super().forward(h) + h @ self.lora_A.T @ self.lora_B.T

    model = tiny_model("llama").eval()
    model.lm_head = LoraLinear(model.lm_head)
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match=r"trainable parameters beside its weight and bias \(lora_A, lora_B\)"):
        causal_lm_loss(model, ids, labels, attention_mask=mask)
    model.lm_head.lora_A.requires_grad_(False)
    model.lm_head.lora_B.requires_grad_(False)
    causal_lm_loss(model, ids, labels, attention_mask=mask)  # frozen at zero: the head's own output


def test_deep_copies_and_pickles_of_a_patched_model():
    """``copy.deepcopy`` (EMA and reference copies) of a patched model runs the copy, and its
    loss reaches the copy's parameters; the model pickles, patched or unpatched, after a fused
    loss has hooked it."""
    import io

    model = patch_model(tiny_model("llama").eval())
    ids, labels, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels)  # the first call hooks the base model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(3.0)
    plain = copy.deepcopy(twin)
    unpatch_model(plain)
    got = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits is None
    assert_rel_close(got.loss, plain(input_ids=ids, attention_mask=mask, labels=labels).loss.double(), RTOL_OWN)
    got.loss.backward()
    assert twin.lm_head.weight.grad is not None and model.lm_head.weight.grad is None
    assert_rel_close(causal_lm_loss(twin, ids, labels, attention_mask=mask), got.loss, 1e-15)

    restored = torch.load(io.BytesIO(_saved(model)), weights_only=False)
    out = restored(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert_rel_close(out.loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss, 1e-15)
    unpatch_model(model)
    assert not model.model._forward_hooks  # unpatching takes the capture's hooks off too
    torch.load(io.BytesIO(_saved(model)), weights_only=False)


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_bamba_z_loss_and_jetmoe_aux_loss():
    """Bamba adds ``z_loss_coefficient * mean(lse**2)`` over every position; JetMoe weighs its
    router loss by ``aux_loss_coef`` (not ``router_aux_loss_coef``)."""
    torch.manual_seed(0)
    bamba = transformers.AutoModelForCausalLM.from_config(
        transformers.BambaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
            mamba_chunk_size=8, attn_layer_indices=[1], z_loss_coefficient=0.1,
        )
    ).double().eval()  # fmt: skip
    jetmoe = transformers.AutoModelForCausalLM.from_config(
        transformers.JetMoeConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
            aux_loss_coef=0.5,
        )
    ).double().eval()  # fmt: skip
    ids, labels, mask = batch()
    for model in (bamba, jetmoe):
        own = model(input_ids=ids, labels=labels)
        loss = causal_lm_loss(model, ids, labels)
        assert_rel_close(loss, own.loss.double(), RTOL_OWN, type(model).__name__)
        for g, g_own in zip(grads(model, loss), grads(model, model(input_ids=ids, labels=labels).loss), strict=True):
            if g_own is not None:
                assert_rel_close(g, g_own, 50 * RTOL_OWN, type(model).__name__, floor=1e-8)


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


def test_a_loss_other_than_for_causal_lm_loss_is_refused():
    """A model whose loss is not ForCausalLMLoss was given the shifted loss silently when its
    forward runs the base model: a loss function set on the model (here smoothed: 5.726 for
    5.694), CpmAnt's unshifted CrossEntropyLoss (7.793 for 7.888)."""
    model = tiny_model("llama").eval()
    ids, labels, _ = batch()
    own = transformers.loss.loss_utils.ForCausalLMLoss
    model.loss_function = lambda logits, labels, vocab_size, **kw: own(logits, labels, vocab_size, **kw) + 1.0
    with pytest.raises(ValueError, match="LlamaForCausalLM's loss is not self.loss_function's ForCausalLMLoss"):
        patch_model(model)(input_ids=ids, labels=labels)
    config = transformers.CpmAntConfig(
        vocab_size=V, hidden_size=D, num_attention_heads=4, dim_head=8, dim_ff=48, num_hidden_layers=2,
        prompt_types=3, prompt_length=2, segment_types=3,
    )  # fmt: skip
    cpmant = transformers.CpmAntForCausalLM(config).eval()
    with pytest.raises(ValueError, match="CpmAntForCausalLM's loss is not"):
        causal_lm_loss(cpmant, ids.clamp_min(1), labels)


def test_ignore_index_reaches_the_loss():
    """``model(..., labels=labels, ignore_index=0)``: transformers hands the keyword to
    ForCausalLMLoss (which also pads the shifted labels with it); it was passed to the base
    model, which ignores it (6.008 for 5.694)."""
    model = tiny_model("llama").eval()
    ids, labels, mask = batch()
    labels = torch.where(labels == -100, 0, labels)  # padding id 0 as the ignored label
    own = model(input_ids=ids, attention_mask=mask, labels=labels, ignore_index=0).loss
    fused = patch_model(model)(input_ids=ids, attention_mask=mask, labels=labels, ignore_index=0).loss
    assert_rel_close(fused, own, RTOL_OWN)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # -100 ignored only
    assert abs(plain.item() - own.item()) > 1e-3


@pytest.mark.parametrize("version", ["inkling", "inkling2"])
def test_a_head_padded_past_the_vocabulary(version):
    """Inkling and Inkling 2 slice their logits to ``config.unpadded_vocab_size`` (Inkling 2's
    default is below its vocab_size): the head's padding rows are no class (the fused loss
    failed on the head check's shapes). Inkling also divides its hidden states by
    ``logits_mup_width_multiplier``."""
    module = pytest.importorskip(f"transformers.models.{version}.modeling_{version}")
    prefix = "Inkling2" if version == "inkling2" else "Inkling"
    torch.manual_seed(0)
    config = getattr(module, f"{prefix}TextConfig")(
        vocab_size=V + 7, unpadded_vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    model = getattr(module, f"{prefix}ForCausalLM")(config).eval()  # float32: its MoE's grouped GEMM takes no float64
    with torch.no_grad():  # logits large enough for a missed scale or softcap to show
        model.get_output_embeddings().weight.normal_(0.0, 2.0)
    ids, labels, mask = batch()
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    fused = causal_lm_loss(model, ids, labels, attention_mask=mask)
    assert_rel_close(fused, own.loss, RTOL_OWN)
    for g, r in zip(grads(model, fused), grads(model, own.loss), strict=True):
        if r is not None:
            assert_rel_close(g, r, 1e-4)


def test_data_parallel_replication_is_refused():
    """``nn.DataParallel`` copies a module's ``__dict__`` into each replica: every replica would
    run the original's patched forward (its weights) and share its hidden-state capture across
    threads."""
    model = patch_model(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="cannot be replicated by nn.DataParallel"):
        model._replicate_for_data_parallel()
    copy.deepcopy(model)  # still copies and pickles
    pickle.dumps(model)
    unpatch_model(model)
    assert model._replicate_for_data_parallel() is not None  # nn.Module's own again


class _SmoothedLlama(transformers.LlamaForCausalLM):
    """A user's subclass with a loss of its own (it calls the base forward without labels)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)  # fmt: skip
        if labels is not None:
            out.loss = F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), label_smoothing=0.1
            )
        return out


class _PassThroughLlama(transformers.LlamaForCausalLM):
    """A subclass that hands its labels on to the base forward: the base's loss."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               logits_to_keep=logits_to_keep, **kwargs)  # fmt: skip


def test_the_loss_check_reads_the_forward_that_runs():
    """A subclass's own loss was accepted (8.556 for 8.515) since a forward further up the MRO
    calls self.loss_function; one that passes its labels to super().forward keeps the base's."""
    ids, labels, mask = batch()
    smoothed = _SmoothedLlama(CONFIGS["llama"]()).eval()
    with pytest.raises(ValueError, match="_SmoothedLlama's loss is not"):
        causal_lm_loss(smoothed, ids, labels)
    through = _PassThroughLlama(CONFIGS["llama"]()).double().eval()
    own = through(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert_rel_close(causal_lm_loss(through, ids, labels, attention_mask=mask), own.double(), RTOL_OWN)


def test_patched_before_its_weights_load():
    """Built on the meta device, patched, then materialised and loaded (init_empty_weights, FSDP2):
    the meta-device check belongs to the loss call, not to patching (patching failed)."""
    real = tiny_model("llama").eval()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).double()
    patch_model(model)
    ids, labels, _ = batch()
    with pytest.raises(ValueError, match="meta device"):
        model(input_ids=ids, labels=labels)
    model.to_empty(device="cpu").load_state_dict(real.state_dict())
    with torch.no_grad():  # the rotary frequencies are not in the state dict
        for name, buffer in real.named_buffers():
            model.get_buffer(name).copy_(buffer)
    model.eval()
    assert_rel_close(
        model(input_ids=ids, labels=labels).loss, real(input_ids=ids, labels=labels).loss.double(), RTOL_OWN
    )


def test_replicas_of_a_model_with_a_capture_are_refused_and_ignore_index_takes_integers():
    """causal_lm_loss on an unpatched model inside nn.DataParallel: its replicas shared the
    capture (8 of 400 losses wrong in a CPU simulation). ignore_index as numpy / tensor ints."""
    import numpy as np

    model = tiny_model("llama").eval()
    ids, labels, mask = batch()
    causal_lm_loss(model, ids, labels)
    with pytest.raises(RuntimeError, match="nn.DataParallel"):
        model._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="nn.DataParallel"):
        copy.deepcopy(model)._replicate_for_data_parallel()
    padded = torch.where(labels == -100, 0, labels)
    want = model(input_ids=ids, labels=padded, ignore_index=0).loss.double()
    for index in (np.int64(0), torch.tensor(0)):
        assert_rel_close(causal_lm_loss(model, ids, padded, ignore_index=index), want, RTOL_OWN)
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        causal_lm_loss(model, ids, padded, ignore_index=0.5)


def test_a_projection_before_the_head_is_named():
    """Electra's generator projects its hidden states to the embedding size before the head: a
    ValueError saying so (it was a raw RuntimeError from the head check's product)."""
    config = transformers.ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=D, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=48, is_decoder=True)  # fmt: skip
    model = transformers.ElectraForCausalLM(config).eval()
    ids, labels, _ = batch()
    with pytest.raises(ValueError, match="hidden states have 32 features but its head"):
        causal_lm_loss(model, ids, labels)
