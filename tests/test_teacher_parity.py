"""The converted real teacher (SmolLM2-135M-Instruct) with the all-fa placement is the teacher."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import eval_texts
from tests.float_bounds import assert_greedy_agrees

pytestmark = pytest.mark.teacher


@pytest.fixture(scope="module")
def teacher_and_supernet(smollm2_dir, smollm2_supernet_dir):
    from supernet.model import SupernetForCausalLM
    from supernet.teacher import load_teacher

    teacher, tokenizer = load_teacher(smollm2_dir)
    out = smollm2_supernet_dir
    supernet = SupernetForCausalLM.from_pretrained(out).eval()
    return teacher, supernet, tokenizer, out


def test_all_fa_reproduces_teacher_logits(teacher_and_supernet):
    teacher, supernet, tokenizer, _ = teacher_and_supernet
    texts = eval_texts(2)
    ids = torch.stack([tokenizer(t, return_tensors="pt").input_ids[0, :192] for t in texts])
    assert supernet.placement.to_list() == ["fa"] * 30
    with torch.no_grad():
        ref = teacher(ids).logits
        ours = supernet(ids).logits
    delta = (ref - ours).abs().max().item()
    assert delta <= 1e-4, f"max |delta logit| = {delta:.3g}"


def test_all_fa_greedy_generation_identical_for_32_tokens(teacher_and_supernet):
    teacher, supernet, tokenizer, _ = teacher_and_supernet
    prompt = eval_texts(1)[0][:400]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = teacher.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                               output_scores=True, return_dict_in_generate=True)
        ours = supernet.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    ref = gen.sequences
    assert ref.shape[1] == ids.shape[1] + 32
    # HF's Llama and our all-fa run different kernels: logits within 1e-4 (the test above), so the
    # tokens may part only where the teacher's top-2 margin is below 2e-4 (a tie under rounding)
    n = ids.shape[1]
    assert_greedy_agrees(ours[:, n:], ref[:, n:], torch.stack(gen.scores, 1), 2e-4)


def test_checkpoint_has_documented_layout(teacher_and_supernet):
    import json

    _, supernet, _, out = teacher_and_supernet
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "supernet"
    assert config["architectures"] == ["SupernetForCausalLM"]
    assert config["placement"] == ["fa"] * 30
    assert config["presets"] == {"teacher": ["fa"] * 30, "all-fa": ["fa"] * 30}
    assert config["teacher_family"] == "llama" and config["norm_layout"] == "pre"
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


def test_every_mixer_gives_finite_logits_after_conversion(teacher_and_supernet):
    teacher, supernet, tokenizer, _ = teacher_and_supernet
    ids = tokenizer(eval_texts(1)[0][:600], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        for p in ("all-swa", "all-gdn", "all-kda"):
            logits = supernet(ids, placement=p).logits
            assert torch.isfinite(logits).all(), p
