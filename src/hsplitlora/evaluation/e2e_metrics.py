"""The five metrics of the E2E NLG Challenge, computed as its official scorer computes them.

- BLEU: NIST mteval-v13a (lowercased, its 13a tokenisation, multi-reference, the closest
  reference length for the brevity penalty, empty padded references skipped), written after its
  definitions; sacrebleu's `13a` tokeniser on lowercased text reproduces its tokens (sacrebleu's
  own BLEU counts the padded empty references as length 0, which favours short outputs).
- NIST: mteval-v13a's NIST, written here because no package reproduces it (nltk's information
  weights and length penalty differ): information weights from all references of the corpus,
  `info(w1..wn) = -log2(count(w1..wn) / count(w1..wn-1))`, score `sum_n matched info / system
  n-grams` (n <= 5) times `exp(beta log^2 min(1, L_sys / L_ref))`, `beta = -ln 0.5 / ln^2 1.5`,
  with `L_ref` the corpus's reference words divided by the mean number of non-empty references
  per instance (instances with fewer references are padded with empty ones, as the official
  scorer does; mteval counts only the non-empty ones).
- METEOR 1.5 (the jar with its paraphrase tables), ROUGE-L and CIDEr through `pycocoevalcap`, after
  that package's PTB tokenizer, as the MS-COCO caption evaluation code computes them.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import math
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from hsplitlora.errors import UsageError, read_text

NIST_ORDER = 5
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# -- reading --------------------------------------------------------------------------------------
def read_references(path: str | Path) -> list[list[str]]:
    """References per instance: an E2E CSV (`mr`, `ref`; rows of one MR grouped in order of first
    appearance) or plain text (one reference per line, instances separated by an empty line)."""
    path = Path(path)
    text = read_text(path, "references file")
    if path.suffix.lower() == ".csv":
        grouped: dict[str, list[str]] = {}
        rows = csv.DictReader(text.splitlines())
        if rows.fieldnames is None or not {"mr", "ref"} <= set(rows.fieldnames):
            raise UsageError(f"references file {path} is a CSV without the columns 'mr' and 'ref'.")
        for row in rows:
            grouped.setdefault(row["mr"], []).append(row["ref"].strip())
        instances = list(grouped.values())
    else:
        instances, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line.strip())
            elif current:
                instances.append(current)
                current = []
        if current:
            instances.append(current)
    if not instances:
        raise UsageError(f"references file {path} holds no references.")
    return instances


def read_outputs(path: str | Path) -> list[str]:
    """System outputs, one per line; an empty line is an empty (valid, if bad) output. The file's
    final line break ends the last output."""
    path = Path(path)
    text = read_text(path, "outputs file")
    if not text:
        raise UsageError(f"outputs file {path} is empty.")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [line.strip() for line in lines]


def check_counts(references: Sequence[Sequence[str]], outputs: Sequence[str]) -> None:
    if len(references) != len(outputs):
        raise UsageError(
            f"there are {len(references)} reference instances but {len(outputs)} outputs; "
            "give exactly one output line per instance, in the same order."
        )


# -- BLEU and NIST (mteval-v13a) ------------------------------------------------------------------
def _mteval_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.translate(_ASCII_LOWER)).split()


def _pad(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Pad every instance to the largest number of references with empty ones (the official
    scorer's reference sets), so the number of sets is the same for every instance."""
    width = max(len(refs) for refs in references)
    return [list(refs) + [""] * (width - len(refs)) for refs in references]


def bleu(references: Sequence[Sequence[str]], outputs: Sequence[str], order: int = 4) -> float:
    """Corpus BLEU as mteval-v13a prints it (0..1): n-gram matches clipped by each n-gram's most
    occurrences in any one reference, the brevity penalty exp(min(0, 1 - R / C)) with R the sum
    over segments of the reference length closest to the output's (ties: the shorter; the padded
    empty references are skipped), and mteval's smoothing of an order without matches (1 / 2^k)."""
    matches, totals, ref_length, sys_length = [0] * (order + 1), [0] * (order + 1), 0, 0
    for refs, output in zip(_pad(references), outputs, strict=True):
        tokens = _mteval_tokens(output)
        ref_tokens = [_mteval_tokens(r) for r in refs]
        ref_length += _closest_length([len(r) for r in ref_tokens], len(tokens))
        sys_length += len(tokens)
        best: Counter = Counter()
        for r in ref_tokens:
            best |= _ngrams(r, order)
        for gram, count in _ngrams(tokens, order).items():
            if gram in best:
                matches[len(gram)] += min(count, best[gram])
        for n in range(1, order + 1):
            totals[n] += max(len(tokens) - n + 1, 0)
    if sys_length == 0:
        return 0.0
    log_score, smooth = 0.0, 1
    for n in range(1, order + 1):
        if totals[n] == 0:
            continue  # mteval adds log 1 for an order the output is too short to have
        if matches[n] == 0:
            smooth *= 2
            log_score += math.log(1 / (smooth * totals[n]))
        else:
            log_score += math.log(matches[n] / totals[n])
    return math.exp(log_score / order) * math.exp(min(0.0, 1 - ref_length / sys_length))


def _closest_length(lengths: Sequence[int], output_length: int) -> int:
    """mteval-v13a's reference length for the brevity penalty: the first reference's, then any
    non-empty one closer to the output's length (on a tie, the shorter)."""
    closest = lengths[0]
    for length in lengths[1:]:
        if not length:
            continue
        distance, best = abs(output_length - length), abs(output_length - closest)
        if distance < best or (distance == best and length < closest):
            closest = length
    return closest


def _ngrams(tokens: Sequence[str], order: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1))


def nist(references: Sequence[Sequence[str]], outputs: Sequence[str], order: int = NIST_ORDER) -> float:
    """Corpus NIST as mteval-v13a computes it. The length penalty compares the output words with
    the reference words per reference, where the number of references is the mean number of
    non-empty references per segment (the padded empty ones do not count)."""
    padded = _pad(references)
    ref_tokens = [[_mteval_tokens(r) for r in refs] for refs in padded]
    counts: Counter = Counter()
    total_words = 0
    for refs in ref_tokens:
        for tokens in refs:
            total_words += len(tokens)
            counts.update(_ngrams(tokens, order))
    info = {
        gram: -math.log(count / (counts[gram[:-1]] if len(gram) > 1 else total_words)) / math.log(2)
        for gram, count in counts.items()
    }
    matched_info = [0.0] * (order + 1)
    system_ngrams = [0] * (order + 1)
    for refs, output in zip(ref_tokens, outputs, strict=True):
        tokens = _mteval_tokens(output)
        for n in range(1, order + 1):
            system_ngrams[n] += max(len(tokens) - n + 1, 0)
        best: Counter = Counter()
        for r in refs:
            best |= _ngrams(r, order)  # the most occurrences of each n-gram in any one reference
        for gram, count in _ngrams(tokens, order).items():
            if gram in best:
                matched_info[len(gram)] += info[gram] * min(count, best[gram])
    score = sum(matched_info[n] / max(system_ngrams[n], 1) for n in range(1, order + 1))
    refs_per_segment = sum(1 for refs in padded for r in refs if r != "") / len(padded)
    return score * _nist_length_penalty(system_ngrams[1] / (total_words / refs_per_segment))


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


# -- METEOR, ROUGE-L, CIDEr (MS-COCO caption evaluation) ------------------------------------------
_meteor = None  # one METEOR process serves every score of this process (its JVM loads its tables for seconds)
_closes_at_exit = False


def meteor_scorer():
    """The process's METEOR scorer, started on first use (again if its JVM has exited)."""
    global _meteor, _closes_at_exit
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        close_meteor()
        if not _closes_at_exit:
            atexit.register(close_meteor)
            _closes_at_exit = True
        _meteor = Meteor()
    return _meteor


def close_meteor() -> None:
    """Stop the METEOR process, if one was started (at exit, after a failed score, or by a caller
    that is done scoring)."""
    global _meteor
    scorer, _meteor = _meteor, None
    if scorer is None:
        return
    with contextlib.suppress(OSError):
        scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    # pycocoevalcap's scorer keeps its lock held when a score fails, and its __del__ takes that lock.
    scorer.lock = threading.Lock()


def coco_metrics(references: Sequence[Sequence[str]], outputs: Sequence[str]) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr after pycocoevalcap's PTB tokenizer (needs Java)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": o}] for i, o in enumerate(outputs)})
    try:
        meteor = float(meteor_scorer().compute_score(gts, res)[0])
    except BaseException as error:
        close_meteor()  # the next score starts a new process
        if isinstance(error, (OSError, ValueError)):  # the JVM went away or answered nonsense
            raise RuntimeError(f"METEOR's Java process failed while scoring ({error!r})") from error
        raise
    return {
        "METEOR": meteor,
        "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
    }


def score_e2e(references: Sequence[Sequence[str]], outputs: Sequence[str]) -> dict[str, float]:
    """{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} for one output per reference instance."""
    check_counts(references, outputs)
    return {"BLEU": bleu(references, outputs), "NIST": nist(references, outputs), **coco_metrics(references, outputs)}
