import math

import pytest
import torch

from emokernels.data.prompts import chat_messages, render
from emokernels.evaluate.naturalness import degeneracy_reasons, degenerate, distinct_n, perplexity, summarize
from tests.helpers import tiny

NATURAL = [
    "I'm so sorry the team ignored your presentation; that must feel awful after all your work.",
    "Wow, I did not expect the landlord to fix the sink the very same day!",
    "The the report is due on Friday, so the team should check the numbers again.",
    "I am NOT happy about this at all.",
    "OK, call the DMV tomorrow.",
]


@pytest.mark.parametrize("text", NATURAL)
def test_natural_text_is_not_degenerate(text):
    assert not degenerate(text), degeneracy_reasons(text)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("!!! ...", "empty"),
    ("I'm sure you're not alone in this. I'm sure you're not alone in this. I'm sure you're not alone in this.", "loop"),
    ("no no no no no no no no", "loop"),
    ("The team ignored it. The team ignored it. The team ignored it. Sad.", "loop"),
    ("FEAR-DANGER-FEAR-DANGER-RUN-NOW everything is FEAR", "all_caps"),
    ("THIS IS ABSOLUTELY UNACCEPTABLE AND I AM DONE", "all_caps"),
    ("hahahahahahahahahahaha", "char_loop"),
    ("Well" + "!" * 12, "char_loop"),
])
def test_degenerate_cases(text, reason):
    reasons = degeneracy_reasons(text)
    assert degenerate(text) and any(r.startswith(reason) for r in reasons), reasons


def test_distinct_n():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one"], 2) == 0.0 and distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)
    with pytest.raises(TypeError):
        distinct_n("a b", 1)


def test_summarize():
    s = summarize(["a b c", "no no no no no"])
    assert s["n"] == 2 and s["degenerate_rate"] == 0.5 and s["mean_words"] == 4.0


def test_perplexity_matches_direct_computation_and_batching():
    model, tok = tiny("llama")
    prompts = [render(tok, chat_messages("I sent the report.", None)), render(tok, chat_messages("My train was late again today, by an hour.", None))]
    replies = ["Good job sending it.", "That is annoying; ask for a refund."]
    batched = perplexity(model, tok, prompts, replies, batch_size=2)
    single = [perplexity(model, tok, [p], [r])[0] for p, r in zip(prompts, replies)]
    assert batched == pytest.approx(single, rel=1e-4)
    # direct: mean NLL of the reply tokens only
    p_ids = tok.encode(prompts[0], add_special_tokens=False)
    r_ids = tok.encode(replies[0], add_special_tokens=False)
    ids = torch.tensor([p_ids + r_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    nll = -sum(logp[len(p_ids) + i - 1, t] for i, t in enumerate(r_ids)) / len(r_ids)
    assert batched[0] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert math.isnan(perplexity(model, tok, prompts[:1], [""])[0])
    with pytest.raises(ValueError, match="replies"):
        perplexity(model, tok, prompts, replies[:1])


def test_caricature_flags_emotion_word_stuffing_but_not_natural_replies():
    from emokernels.data.reference import load_judge_reference
    from emokernels.evaluate.naturalness import caricature, emotion_word_density, unnatural

    stuffed = "Sold! Disgusting disgusts! I'm disgusted with disgusting disgusting food."
    assert caricature(stuffed) and unnatural(stuffed)
    assert emotion_word_density(stuffed) > 0.4
    assert not caricature("This makes me so happy — your mother is in remission!")
    assert not any(caricature(r.text) for r in load_judge_reference())  # hand-written replies
    assert emotion_word_density("") == 0.0
