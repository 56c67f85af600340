"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, computed with the COCO caption scorers.

This module only scores text against text. Running a model over a split to get the captions is
evaluation.py's; it hands the results to `score_captions`, `print_metrics_table` and `write_report`.

The scorers (pycocoevalcap) are imported lazily so that importing this module stays cheap. Two of
them need Java: the Stanford PTB tokenizer and METEOR. Without Java we tokenize with a pure-Python
copy of the PTB rules (scores then differ from the official ones only on unusual punctuation) and
report METEOR as None.
"""
import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading

from rich.table import Table

from captioning.utils import CaptioningError, atomic_write_json, console

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
SCORE_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
METEOR_SKIPPED = "METEOR skipped: Java was not found (install a Java runtime to compute it)."


@functools.lru_cache(maxsize=1)
def java_available():
    """True when a working `java` is on PATH.

    Checking shutil.which alone is not enough: macOS ships a /usr/bin/java stub that only prints
    "Unable to locate a Java Runtime", so we also run `java -version` once (cached)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        proc = subprocess.run([java, "-version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


# -----------------------------------------------------------------------------
# tokenization

# Control, zero-width and surrogate characters: the Java tokenizer treats them as spaces, and a lone
# surrogate could not even be written out as UTF-8.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")


def _clean(text):
    # One line, single spaces. The PTB tokenizer and METEOR both talk to Java one line per caption, so
    # any line break (\n, \r, \u2028, ...) inside a caption would shift every later caption.
    return " ".join(_INVISIBLE.sub(" ", str(text)).split()) if text is not None else ""


def _ptb_tokenize_java(texts):
    """Tokenize with the Stanford PTB tokenizer shipped in pycocoevalcap, exactly as its PTBTokenizer does.

    We call the jar ourselves instead of PTBTokenizer.tokenize because that writes its temporary file
    into site-packages (fails on read-only installs), lets Java chat on stderr, and silently misaligns
    captions if the line count comes back wrong."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    drop = set(ptbtokenizer.PUNCTUATIONS)
    fd, tmp = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(texts))
        proc = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                               "-encoding", "utf-8", "-preserveLines", "-lowerCase", tmp],
                              stdin=subprocess.DEVNULL, capture_output=True)
    finally:
        os.unlink(tmp)
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CaptioningError(f"The Java PTB tokenizer failed: {detail[-1] if detail else 'no message'}")
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) == len(texts) + 1 and lines[-1] == "":
        lines.pop()  # the final newline
    if len(lines) != len(texts):  # never guess which caption a line belongs to
        raise CaptioningError(f"The Java PTB tokenizer returned {len(lines)} lines for {len(texts)} captions.")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in lines]


# Pure-Python PTB rules. They follow what stanford-corenlp 3.4.1 does with -lowerCase, followed by
# pycocoevalcap's removal of its PUNCTUATIONS list (". , ? ! : ; - -- ... ' ` '' ``" and the
# upper-case bracket names). Some quirks are kept on purpose so both paths agree: brackets become
# "-lrb-" etc. in lower case and so are NOT removed, "?!" or "!!" stay as tokens, "|" is its own token.
_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                 ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "co", "inc", "ltd", "mt", "ft"}
_SPLITS = [
    (re.compile(r"[\u2018\u201a\u201b\u2019\u2032]"), "'"),    # curly single quotes act as apostrophes
    (re.compile(r"[\"\u201c\u201d\u201e\u00ab\u00bb`]"), " "),  # double quotes: removed tokens anyway
    (re.compile(r"[\u2013\u2014]|-{2,}"), " -- "),               # dashes
    (re.compile(r"\.\.\.+|\u2026"), " ... "),
    (re.compile(r"(?<=[^.])\.\.(?=[^.])"), " . . "),
    (re.compile(r"(?i)'n'"), " 'n' "),                          # rock'n'roll, slip 'n' slide
    (re.compile(r"[?!]+"), r" \g<0> "),
    (re.compile(r"[;#$%&|=+*~^<>\\]"), r" \g<0> "),
    (re.compile(r",(?!\d)|(?<!\d),"), " , "),                  # keep 1,000
    (re.compile(r":(?!\d)|(?<!\d):"), " : "),                  # keep 5:30
    (re.compile(r"(?i)\b(can)(not)\b|\b(gon|wan|got)(na)\b"), r" \1\3 \2\4 "),
    (re.compile(r"(?i)n't\b"), " n't"),
    (re.compile(r"(?i)(?<=\w)'(s|m|d|ll|re|ve)\b"), r" '\1"),
    (re.compile(r"(?<=\s)'(?!(?:s|m|d|ll|re|ve|em|til)\b|n'\s)"), " ' "),  # opening quote
    (re.compile(r"(?<=[^\s'])(?<!\s'n)'(?=\s)"), " '"),                  # closing quote, dogs'
]


def _split_period(token, last):
    # A final period is its own token unless the word is an abbreviation ("st.", "p.m.", "u.s.").
    # At the end of the line PTB splits it anyway (adding a second period for abbreviations, which
    # is removed), except for one-letter initials like "u." or "a."
    if len(token) < 2 or not token.endswith(".") or token == "...":
        return [token]
    stem = token[:-1]
    if "." in stem or stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
        return [token]
    return [stem, "."]


def ptb_tokenize(text):
    """Pure-Python stand-in for PTBTokenizer + punctuation removal; returns the tokens joined by spaces."""
    text = " " + _clean(text).lower() + " "
    for ch, name in _BRACKETS.items():
        text = text.replace(ch, f" {name} ")
    for pattern, repl in _SPLITS:
        text = pattern.sub(repl, text)
    words = text.split()
    tokens = []
    for i, w in enumerate(words):
        tokens.extend(_split_period(w, last=(i == len(words) - 1)))
    return " ".join(t for t in tokens if t not in _PUNCTUATIONS)


# -----------------------------------------------------------------------------
# scoring

def _meteor(gts, res):
    """METEOR through pycocoevalcap's long-running Java process, always shut down afterwards.

    The Java side answers one line per request; if it ever stops answering (bad input, crash) the
    reads would block forever, so the work runs in a thread with a time limit and we kill Java on
    timeout. Returns (score or None, message or None)."""
    from pycocoevalcap.meteor.meteor import Meteor
    # METEOR's line protocol separates fields with "|||". The PTB tokenizer already splits "|||" into
    # "| | |", but dropping pipes altogether means no caption can ever fake a separator.
    gts = {k: [" ".join(r.replace("|", " ").split()) for r in v] for k, v in gts.items()}
    res = {k: [" ".join(r.replace("|", " ").split()) for r in v] for k, v in res.items()}
    try:
        meteor = Meteor()
    except OSError as e:
        return None, f"METEOR skipped: could not start Java ({e})."
    result, error = {}, {}

    def work():
        try:
            result["score"] = meteor.compute_score(gts, res)[0]
        except Exception as e:  # noqa: BLE001 - reported as a skipped metric below
            error["e"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=120 + 0.1 * len(res))
    timed_out = thread.is_alive()
    proc = meteor.meteor_p
    # Killing Java makes a blocked read return, so the thread ends before we close its pipes.
    for close in (proc.stdin.close, proc.kill, proc.wait):
        with contextlib.suppress(Exception):
            close()
    thread.join(timeout=10)
    for close in (proc.stdout.close, proc.stderr.close):
        with contextlib.suppress(Exception):
            close()
    # Meteor.__del__ takes its lock, which compute_score leaves held when it fails half-way; a fresh
    # lock keeps garbage collection from hanging.
    meteor.lock = threading.Lock()
    del meteor
    if timed_out:
        return None, "METEOR timed out and was skipped."
    if "e" in error:
        return None, f"METEOR failed and was skipped ({type(error['e']).__name__}: {error['e']})."
    return float(result["score"]), None


def score_captions(candidates, references, metrics=METRICS, use_java=None):
    """Score candidate captions against reference captions over a whole set.

    candidates: {key: caption}; references: {key: [caption, ...]}. Keys are anything hashable (image
    paths, ids). Only the candidates' keys are scored; each needs at least one non-empty reference.
    Returns {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D": float or None}; metrics not asked for
    or not computable (METEOR without Java) are None.

    use_java: None picks the Java PTB tokenizer and METEOR when Java works, False forces the pure-Python
    tokenizer and skips METEOR, True requires Java."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise CaptioningError(f"Unknown metric(s) {', '.join(sorted(unknown))}; known: {', '.join(METRICS)}.")
    refs = _references(candidates, references)
    java = java_available() if use_java is None else use_java
    if use_java and not java_available():
        raise CaptioningError("Java was asked for but no working `java` was found on PATH.")
    gts, res = _tokenized(candidates, refs, java)
    scores = {name: None for name in SCORE_KEYS}
    # The scorers print progress (Bleu prints its n-gram counts); stdout must stay clean for --json.
    with contextlib.redirect_stdout(io.StringIO()):
        scores.update(_coco_scores(gts, res, metrics))
        if "METEOR" in metrics:
            if java:
                scores["METEOR"], message = _meteor(gts, res)
            else:
                message = "METEOR skipped: Java not used." if use_java is False else METEOR_SKIPPED
            if message:
                console.print(message, style="yellow", markup=False)
    return scores


def _references(candidates, references):
    """{key: cleaned non-empty references} for every candidate; one clear error when any has none."""
    if not candidates:
        raise CaptioningError("There are no captions to score.")
    refs = {k: [r for r in (_clean(r) for r in references.get(k, ())) if r] for k in candidates}
    missing = [k for k in candidates if not refs[k]]
    if missing:
        raise CaptioningError(f"{len(missing)} of {len(refs)} captioned images have no reference captions "
                              f"(first: {missing[0]}).")
    return refs


def _tokenized(candidates, refs, use_java):
    """PTB-tokenize everything in one batch (one Java start) → (gts, res) as the scorers want them:
    {string id: [tokens of each reference]}, {string id: [tokens of the candidate]}."""
    keys = list(candidates)
    flat = [_clean(candidates[k]) for k in keys] + [r for k in keys for r in refs[k]]
    nonempty = [i for i, t in enumerate(flat) if t]  # empty lines are not sent to Java at all
    tokens = [""] * len(flat)
    if use_java:
        for i, t in zip(nonempty, _ptb_tokenize_java([flat[i] for i in nonempty])):
            tokens[i] = t
    else:
        for i in nonempty:
            tokens[i] = ptb_tokenize(flat[i])
    res = {str(i): [tokens[i]] for i in range(len(keys))}
    gts, j = {}, len(keys)
    for i, k in enumerate(keys):
        gts[str(i)] = tokens[j:j + len(refs[k])]
        j += len(refs[k])
    return gts, res


def _coco_scores(gts, res, metrics):
    """BLEU-1..4, ROUGE-L and CIDEr-D (those in `metrics`) from pycocoevalcap's scorers."""
    scores = {}
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu
        bleu, _ = Bleu(4).compute_score(gts, res)
        for n, value in enumerate(bleu, 1):
            scores[f"BLEU-{n}"] = float(value)
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider
        # pycocoevalcap's Cider is CIDEr-D and takes its idf from the references passed in, so a
        # score depends on the evaluated set: compare models only on the same split. With a single
        # image every n-gram has idf 0 and CIDEr-D is 0 by construction.
        if any(r for rs in gts.values() for r in rs):
            scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
        else:  # no reference n-grams at all: Cider's idf step would fail on an empty table
            scores["CIDEr-D"] = 0.0
    return scores


# -----------------------------------------------------------------------------
# reporting

def print_metrics_table(scores, title="Caption metrics"):
    """A two-column rich table on the console (stderr); metrics that were skipped show as 'skipped'."""
    table = Table(title=title)
    table.add_column("Metric")
    table.add_column("Score", justify="right")
    for name, value in scores.items():
        table.add_row(name, "skipped" if value is None else f"{value:.4f}")
    console.print(table)


def write_report(path, scores, captions, settings=None):
    """Write {"scores": {...}, "settings": {...}, "captions": [...]} as JSON, atomically (readers never
    see half a file). `settings` says how the captions were made (split, search), so a score is never
    separated from what it measured."""
    report = {"scores": {k: (None if v is None else float(v)) for k, v in scores.items()},
              "settings": dict(settings or {}), "captions": list(captions)}
    return atomic_write_json(path, report)
