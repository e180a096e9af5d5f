"""Language identification with py3langid (offline, model shipped in the wheel)."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_identifier = None


def _get():
    global _identifier
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE
            from py3langid.langid import LanguageIdentifier as _LI

            _identifier = _LI.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


class LanguageIdentifier:
    """`detect` gives (language, probability); `prob_of` gives P(a given language); as a
    scorer, `score` is P(the response is in its prompt's language), 0..1."""

    def score(self, prompts: list[str], responses: list[str], progress=None, *,
              langs: list[str] | None = None) -> list[float]:
        if langs is None:
            raise ValueError("the langid scorer needs each response's prompt language")
        return self.prob_of(responses, langs)

    def detect(self, texts: list[str]) -> tuple[list[str], list[float]]:
        ident = _get()
        langs, probs = [], []
        for text in texts:
            if not text.strip():
                langs.append("und")
                probs.append(0.0)
                continue
            lang, p = ident.classify(text)
            langs.append(lang)
            probs.append(float(p))
        return langs, probs

    def prob_of(self, texts: list[str], langs: list[str]) -> list[float]:
        ident = _get()
        out = []
        for text, lang in zip(texts, langs):
            if not text.strip():
                out.append(0.0)
                continue
            out.append(float(dict(ident.rank(text)).get(lang, 0.0)))
        return out
