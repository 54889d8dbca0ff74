"""Whether the teacher's stored top-k can teach this student under the configured loss, decided
before anything is built: forward_kl / reverse_kl / jsd read the teacher's ids as the student's,
so they need one tokenizer; gold and uld align the teacher's tokens to the student's by their
bytes, so they need traces that keep those bytes (or a teacher tokenizer that is the student's)."""

from __future__ import annotations

from pathlib import Path

from distill.data.store import MANIFEST, column_filled, read_manifest, shard_paths
from distill.data.traces import as_source
from distill.errors import DistillError
from distill.losses import DIVERGENCES
from distill.train.config import LossConfig


def check_teacher_vocabulary(sources, tokenizer, loss: LossConfig, top_k: int) -> None:
    """One-line DistillError where a trace run's teacher top-k cannot train this student with
    `loss`. Runs without a manifest (public datasets) carry no top-k and are not looked at."""
    if not top_k or loss.kind == "sft" or loss.alpha == 0:
        return
    student = tokenizer.vocabulary_fingerprint()
    for spec in sources:
        run = Path(str(as_source(spec).source))
        if not (run / MANIFEST).is_file():
            continue
        teacher = read_manifest(run).get("tokenizer")
        same = teacher is not None and teacher.get("vocabulary") == student
        if DIVERGENCES[loss.kind].reads_unmatched:
            if not same and not column_filled(shard_paths(run, verify=False), "top_bytes"):
                unknown = "" if teacher else ", nor do they name the teacher's tokenizer"
                raise DistillError(
                    f"{run}: loss {loss.kind} distils across tokenizers through the bytes of the "
                    f"teacher's tokens, and these traces keep none{unknown} (generate them again "
                    "with logprobs, teacher.tokenizer set for an HTTP teacher; or use loss.kind "
                    "sft)")
        elif teacher is not None and not same:
            raise DistillError(
                f"{run}: the teacher's tokenizer ({teacher.get('source')}, "
                f"{teacher.get('vocab_size')} ids) is not the student's ({tokenizer.vocab_size} "
                f"ids): loss {loss.kind} reads the teacher's ids as the student's; set loss.kind "
                f"{' or '.join(_across_tokenizers())} to distil across tokenizers")


def _across_tokenizers() -> list[str]:
    """The divergences that read the teacher's unmatched entries (they align tokenizers)."""
    return [name for name, kind in DIVERGENCES.items() if kind.reads_unmatched]

