"""SDXL prompt encoding and size ids against diffusers' SDXL pipelines on tiny CLIP models.

The second tokenizer pads with "!" (as SDXL's CLIP-bigG tokenizer does) and the first with EOS, so
padding with the wrong tokenizer's pad token changes the hidden states after EOS and shows."""
import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import rel_err
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldmcore.text import WINDOW, build_word_tokenizer
from ldmcore.text_sdxl import SDXLPromptEncoder, refiner_size_ids, size_ids

WORDS = "a red green blue circle square triangle on white black background photo of sks".split()
PROMPTS = ["a red circle", "a photo of sks blue square on white background"]  # different lengths
NEGATIVES = ["black background", "green triangle"]


def text_config(tok) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=WINDOW,
        projection_dim=32,
        # transformers pools at the first eos_token_id of its config: it must be the tokenizer's
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    tok = build_word_tokenizer(WORDS)
    tok_2 = build_word_tokenizer(WORDS)
    tok_2.pad_token = "!"
    assert tok.pad_token_id == tok.eos_token_id != tok_2.pad_token_id
    return SimpleNamespace(
        tok=tok,
        te=CLIPTextModel(text_config(tok)).eval(),
        tok_2=tok_2,
        te_2=CLIPTextModelWithProjection(text_config(tok_2)).eval(),
    )


def encoder(m, **kwargs) -> SDXLPromptEncoder:
    return SDXLPromptEncoder(m.tok, m.te, m.tok_2, m.te_2, **kwargs)


def diffusers_encode(m, prompts, negative, clip_skip=None, refiner=False, force_zeros=False):
    """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) from diffusers' encode_prompt;
    text encoding needs neither a U-Net nor a VAE."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    common = dict(vae=None, unet=None, scheduler=None, add_watermarker=False, force_zeros_for_empty_prompt=force_zeros)
    if refiner:  # the refiner pipeline: no first text encoder
        pipe = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, text_encoder_2=m.te_2, tokenizer_2=m.tok_2,
            requires_aesthetics_score=True, **common,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            text_encoder=m.te, tokenizer=m.tok, text_encoder_2=m.te_2, tokenizer_2=m.tok_2, **common
        )
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative, clip_skip=clip_skip,
        )


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_prompts_match_diffusers(sdxl, clip_skip):
    embeds, negative_embeds, pooled, negative_pooled = diffusers_encode(sdxl, PROMPTS, NEGATIVES, clip_skip or None)
    enc = encoder(sdxl, clip_skip=clip_skip)
    with torch.no_grad():
        ours = enc(PROMPTS)
        # diffusers encodes the negative prompt at hidden_states[-2] whatever clip_skip says
        negative = encoder(sdxl)(NEGATIVES)
    assert ours["hidden"].shape == (2, WINDOW, 64) and ours["pooled"].shape == (2, 32)
    assert rel_err(ours["hidden"], embeds) < 1e-6
    assert rel_err(ours["pooled"], pooled) < 1e-6
    assert rel_err(negative["hidden"], negative_embeds) < 1e-6
    assert rel_err(negative["pooled"], negative_pooled) < 1e-6

    ids, ids_2 = enc.tokenize(PROMPTS)
    assert ids[0, 4:].eq(sdxl.tok.pad_token_id).all() and ids_2[0, 5:].eq(sdxl.tok_2.pad_token_id).all()
    if clip_skip:  # another layer, so the check above can tell layers apart
        with torch.no_grad():
            assert rel_err(ours["hidden"], encoder(sdxl)(PROMPTS)["hidden"]) > 1e-3


def test_empty_prompt_is_encoded_not_zeroed(sdxl):
    # diffusers zeroes the unconditional input only when no negative prompt is given at all
    _, zeros, _, pooled_zeros = diffusers_encode(sdxl, PROMPTS[:1], None, force_zeros=True)
    assert not zeros.any() and not pooled_zeros.any()
    with torch.no_grad():
        ours = encoder(sdxl)([""])
    for force_zeros in (False, True):  # an explicit "" is encoded either way
        _, embeds, _, pooled = diffusers_encode(sdxl, PROMPTS[:1], [""], force_zeros=force_zeros)
        assert rel_err(ours["hidden"], embeds) < 1e-6
        assert rel_err(ours["pooled"], pooled) < 1e-6


def test_long_prompt_windows(sdxl):
    words = (WORDS * 11)[:150]
    long_prompt = " ".join(words)
    assert len(sdxl.tok(long_prompt, add_special_tokens=False)["input_ids"]) == 150
    chunks = [" ".join(words[:75]), " ".join(words[75:])]
    with torch.no_grad():
        ours = encoder(sdxl, max_windows=3)([long_prompt, "a red circle"])
        alone = encoder(sdxl)(["a red circle", ""])
    assert ours["hidden"].shape == (2, 2 * WINDOW, 64) and ours["pooled"].shape == (2, 32)
    chunk_pooled = []
    for i, chunk in enumerate(chunks):
        embeds, _, pooled, _ = diffusers_encode(sdxl, [chunk], None)
        assert rel_err(ours["hidden"][:1, i * WINDOW : (i + 1) * WINDOW], embeds) < 1e-6
        chunk_pooled.append(pooled)
    assert rel_err(ours["pooled"][:1], chunk_pooled[0]) < 1e-6  # the first window's
    assert rel_err(chunk_pooled[1], chunk_pooled[0]) > 1e-3  # ... which is not the second's
    # the short prompt of the batch: its own window, then an empty one
    assert rel_err(ours["hidden"][1:, :WINDOW], alone["hidden"][:1]) < 1e-6
    assert rel_err(ours["hidden"][1:, WINDOW:], alone["hidden"][1:]) < 1e-6
    assert rel_err(ours["pooled"][1:], alone["pooled"][:1]) < 1e-6

    # one window: truncated to 75 tokens, as diffusers does
    embeds, _, pooled, _ = diffusers_encode(sdxl, [long_prompt], None)
    with torch.no_grad():
        truncated = encoder(sdxl, max_windows=1)([long_prompt])
    assert truncated["hidden"].shape == (1, WINDOW, 64)
    assert rel_err(truncated["hidden"], embeds) < 1e-6
    assert rel_err(truncated["pooled"], pooled) < 1e-6


def test_both_encoders_get_the_same_window_count(sdxl):
    """The two vocabularies can split a prompt into different numbers of tokens; the hidden states
    are concatenated on channels, so the shorter side gets an empty window."""
    tok_2 = build_word_tokenizer([w for w in WORDS if w != "triangle"])  # "triangle" becomes pieces
    tok_2.pad_token = "!"
    m = SimpleNamespace(tok=sdxl.tok, te=sdxl.te, tok_2=tok_2, te_2=sdxl.te_2)
    prompt = " ".join(["triangle"] + ["red"] * 73)
    n, n_2 = (len(t(prompt, add_special_tokens=False)["input_ids"]) for t in (sdxl.tok, tok_2))
    assert n <= WINDOW - 2 < n_2
    enc = encoder(m)
    ids, ids_2 = enc.tokenize([prompt])
    assert ids.shape == ids_2.shape == (1, 2 * WINDOW)
    empty_window = [sdxl.tok.bos_token_id, sdxl.tok.eos_token_id] + [sdxl.tok.pad_token_id] * (WINDOW - 2)
    assert ids[0, WINDOW:].tolist() == empty_window
    with torch.no_grad():
        out = enc([prompt])
        empty = encoder(sdxl)([""])
    assert out["hidden"].shape == (1, 2 * WINDOW, 64)
    assert rel_err(out["hidden"][:, WINDOW:, :32], empty["hidden"][..., :32]) < 1e-6


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_refiner_matches_diffusers(sdxl, clip_skip):
    embeds, negative_embeds, pooled, negative_pooled = diffusers_encode(
        sdxl, PROMPTS, NEGATIVES, clip_skip or None, refiner=True
    )
    enc = SDXLPromptEncoder(None, None, sdxl.tok_2, sdxl.te_2, clip_skip=clip_skip)
    with torch.no_grad():
        ours = enc(PROMPTS)
        negative = SDXLPromptEncoder(None, None, sdxl.tok_2, sdxl.te_2)(NEGATIVES)
    assert ours["hidden"].shape == (2, WINDOW, 32) and ours["pooled"].shape == (2, 32)
    assert rel_err(ours["hidden"], embeds) < 1e-6
    assert rel_err(ours["pooled"], pooled) < 1e-6
    assert rel_err(negative["hidden"], negative_embeds) < 1e-6
    assert rel_err(negative["pooled"], negative_pooled) < 1e-6
    # and it is the second encoder's part of the base model's context
    with torch.no_grad():
        base = encoder(sdxl, clip_skip=clip_skip)(PROMPTS)
    assert rel_err(ours["hidden"], base["hidden"][..., 32:]) < 1e-6


def test_lora_injected_and_ddp_wrapped_encoders(sdxl):
    import torch.distributed as dist
    from peft import LoraConfig, inject_adapter_in_model
    from torch.nn.parallel import DistributedDataParallel

    m = SimpleNamespace(tok=sdxl.tok, te=copy.deepcopy(sdxl.te), tok_2=sdxl.tok_2, te_2=copy.deepcopy(sdxl.te_2))
    g = torch.Generator().manual_seed(1)
    for model in (m.te, m.te_2):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts lora_B at zero, which would change nothing
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    embeds, _, pooled, _ = diffusers_encode(m, PROMPTS, NEGATIVES)
    with torch.no_grad():
        ours = encoder(m)(PROMPTS)
        plain = encoder(sdxl)(PROMPTS)
    assert rel_err(ours["hidden"], embeds) < 1e-6 and rel_err(ours["pooled"], pooled) < 1e-6
    assert rel_err(ours["hidden"], plain["hidden"]) > 1e-3 and rel_err(ours["pooled"], plain["pooled"]) > 1e-3

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = SDXLPromptEncoder(m.tok, DistributedDataParallel(m.te), m.tok_2, DistributedDataParallel(m.te_2))
        assert wrapped.device == torch.device("cpu")
        with torch.no_grad():
            out = wrapped(PROMPTS)
    finally:
        if started:
            dist.destroy_process_group()
    assert rel_err(out["hidden"], ours["hidden"]) < 1e-6 and rel_err(out["pooled"], ours["pooled"]) < 1e-6


def test_mismatched_eos_or_clip_skip_fails_early(sdxl):
    for eos in (sdxl.tok_2.eos_token_id + 5, 2):  # another id; the legacy 2, which pools at the highest id
        cfg = text_config(sdxl.tok_2)
        cfg.eos_token_id = eos
        with pytest.raises(ValueError, match="wrong token"):
            SDXLPromptEncoder(sdxl.tok, sdxl.te, sdxl.tok_2, CLIPTextModelWithProjection(cfg))
    with pytest.raises(ValueError, match="clip_skip=3"):
        encoder(sdxl, clip_skip=3)
    with pytest.raises(ValueError, match="both tokenizer and text_encoder"):
        SDXLPromptEncoder(sdxl.tok, None, sdxl.tok_2, sdxl.te_2)


def fake_pipeline(time_ids: int, requires_aesthetics_score: bool = False):
    """What `_get_add_time_ids` reads of a pipeline: the U-Net's add-embedding width, which it only
    checks against the number of ids, and the config flag."""
    unet = SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=8),
        add_embedding=SimpleNamespace(linear_1=torch.nn.Linear(8 * time_ids + 32, 4)),
    )
    return SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=requires_aesthetics_score))


def test_size_ids_match_diffusers():
    from diffusers import StableDiffusionXLPipeline

    pipe = fake_pipeline(6)
    original, crop, target = (1024, 768), (16, 48), (896, 640)
    expected = StableDiffusionXLPipeline._get_add_time_ids(pipe, original, crop, target, torch.float32, 32)
    ours = size_ids(original, crop, target)
    assert ours.shape == (6,) and ours.dtype == torch.float32
    assert torch.equal(ours, expected[0])

    originals = torch.tensor([[1024, 768], [512, 1536]])
    batched = size_ids(originals, crop, target)
    assert batched.shape == (2, 6)
    for row, o in zip(batched, originals.tolist()):
        one = StableDiffusionXLPipeline._get_add_time_ids(pipe, tuple(o), crop, target, torch.float32, 32)
        assert torch.equal(row, one[0])


def test_refiner_size_ids_match_diffusers():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = fake_pipeline(5, requires_aesthetics_score=True)
    original, crop = (1024, 768), (16, 48)
    negative_original, negative_crop = (512, 384), (0, 8)
    expected, expected_negative = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        pipe, original, crop, (896, 640), 6.0, 2.5, negative_original, negative_crop, (896, 640), torch.float32, 32
    )
    ours = refiner_size_ids(original, crop, 6.0)
    assert ours.shape == (5,)
    assert torch.equal(ours, expected[0])
    assert torch.equal(refiner_size_ids(negative_original, negative_crop, 2.5), expected_negative[0])

    batched = refiner_size_ids(original, crop, torch.tensor([6.0, 2.5]))
    assert batched.shape == (2, 5)
    assert torch.equal(batched[0], expected[0]) and torch.equal(batched[1, 4], torch.tensor(2.5))
