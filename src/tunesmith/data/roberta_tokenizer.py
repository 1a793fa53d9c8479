"""Build a RoBERTa-layout tokenizer from GPT-2's BPE files (for offline MLM pre-training).

RoBERTa uses GPT-2's byte-level BPE with fairseq's special tokens first: <s>=0, <pad>=1,
</s>=2, <unk>=3. RoBERTa's positions start after the padding id (pad_token_id + 1), so pad
must be a small id; simply adding the specials to GPT-2's vocabulary would give them ids above
50256. This shifts GPT-2's ids by 4 and appends <mask>. The ids differ from the released
roberta-base vocabulary, so use it for pre-training from scratch only.

    python -m tunesmith.data.roberta_tokenizer ../shared/data/tokenizers/gpt2/hf outputs/roberta-tok
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tunesmith.errors import TunesmithError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def build(gpt2_dir: str | Path, out_dir: str | Path) -> Path:
    from transformers import RobertaTokenizerFast

    src = Path(gpt2_dir)
    vocab_file, merges = src / "vocab.json", src / "merges.txt"
    for f in (vocab_file, merges):
        if not f.is_file():
            raise TunesmithError(f"{f} not found: pass a folder with GPT-2's vocab.json and "
                                 "merges.txt")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    shifted = {tok: i for i, tok in enumerate(SPECIALS)}
    shifted.update({tok: i + len(SPECIALS) for tok, i in vocab.items()})
    shifted["<mask>"] = len(shifted)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(shifted), encoding="utf-8")
        tok = RobertaTokenizerFast(str(Path(tmp) / "vocab.json"), str(merges))
        tok.save_pretrained(str(out_dir))
    return Path(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tunesmith.data.roberta_tokenizer GPT2_DIR OUT_DIR")
    print(build(sys.argv[1], sys.argv[2]))
