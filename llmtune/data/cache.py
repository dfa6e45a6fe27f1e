"""Tokenized data cached between runs, keyed by what determines it.

The key covers the sources' content fingerprints, the data section (formats, template, loss mask,
packing, ...), the seed (shuffling and mixtures), and the tokenizer itself (its full serialisation,
special tokens and chat template), so any change that could alter a token misses the cache.
Entries are written to a temporary folder and renamed into place: a crash never leaves half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from llmtune.models.builtin import cache_root

CACHE_VERSION = 1  # bump when the tokenized layout changes


class TokenizedCache:
    def __init__(self, cfg, fingerprints: dict[str, str], tokenizer, seed: int, examples: str | None = None):
        key = {
            "version": CACHE_VERSION,
            "data": cfg.model_dump(mode="json", exclude={"cache", "strict"}),
            "fingerprints": fingerprints,
            "seed": seed,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
        if examples is not None:  # what the method trains on: the same rows can become different examples
            key["examples"] = examples
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = cache_root() / "data" / digest

    def load(self):
        from llmtune.data import PreparedData

        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            return None
        import datasets

        meta = json.loads(meta_file.read_text())
        eval_rows = meta["eval_rows"]
        if meta["kind"] == "classification":
            eval_rows = [tuple(row) for row in eval_rows]
        return PreparedData(
            train=datasets.load_from_disk(str(self.path / "train")),
            eval=datasets.load_from_disk(str(self.path / "eval")) if (self.path / "eval").is_dir() else None,
            eval_rows=eval_rows,
            label_names=meta["label_names"],
            fingerprints=meta["fingerprints"],
            stats=meta["stats"] | {"cached": str(self.path)},
            kind=meta["kind"],
        )

    def save(self, data) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=".tmp-"))
        try:
            data.train.save_to_disk(str(tmp / "train"))
            if data.eval is not None:
                data.eval.save_to_disk(str(tmp / "eval"))
            meta = {
                "kind": data.kind,
                "eval_rows": data.eval_rows,
                "label_names": data.label_names,
                "fingerprints": data.fingerprints,
                "stats": data.stats,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            if self.path.exists():  # another run wrote the same entry meanwhile
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, self.path)
        except OSError:  # a cache that cannot be written (read-only disk, race) costs time, not the run
            shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    )
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update((tokenizer.chat_template or "").encode())
    digest.update(str(tokenizer.padding_side).encode())
    return digest.hexdigest()
