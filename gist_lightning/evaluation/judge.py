"""The paper's pairwise comparison: a judge model reads a task and two answers and says which is
better, or that they tie. Each record is judged twice, the answers swapped, so that a judge who
prefers the first (or second) position cancels out: an answer wins a record only when both
orders prefer it; anything else is a tie. Reported: win / tie / loss rates of A against B and
the win rate with ties counted half (the paper's), each with a bootstrap 95% interval over records.

The judge is any OpenAI-compatible chat endpoint (``--url``, ``--model``, an API key from the
environment); the records are two prediction CSVs (columns ``x, y_pred``, as gist-lightning's
validation writes them and the authors released them), paired by prompt (gist tokens removed, so
runs with different k pair up).
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataFormatError, GistError
from ..files import write_text_atomic
from ..templates import without_gists
from .metrics import read_predictions_csv
from .stats import bootstrap_interval

SYSTEM = ("You are a careful grader. You read a task and two answers to it and decide which answer does what "
          "the task asks better: correct, complete, and nothing that was not asked for. Reply with one word: "
          "A, B or TIE.")
QUESTION = ("Task:\n{task}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            "Which answer does the task better? Reply A, B or TIE.")
# the verdict is the reply's first word, alone or followed by punctuation ("A", "B.", "Answer A:",
# "TIE\n..."), so that a reply opening with the article ("A good answer...") is not read as a vote for A
_VERDICT = re.compile(r"^\W*(?:ANSWER\s+)?(TIE|A|B)(?:$|[^\w\s]|\s*\n)")


def task_text(x: str) -> str:
    """The prompt of a predictions row as the judge sees it: the gist tokens removed, the trailing
    ``Output:`` cue dropped."""
    return re.sub(r"\n?Output:\s*$", "", without_gists(x)).strip()


def parse_verdict(reply: str) -> str | None:
    """"A", "B", "TIE" from a judge's reply (its first word, "Answer B" too), None if it says neither."""
    m = _VERDICT.match(reply.strip().upper())
    return m.group(1) if m else None


def combine(first_order: str | None, swapped: str | None) -> str:
    """The outcome for A of a record judged (A, B) then (B, A): "win", "loss" or "tie"."""
    a_first = {"A": "a", "B": "b"}.get(first_order or "")
    a_swapped = {"A": "b", "B": "a"}.get(swapped or "")  # in the swapped question, answer A is B's
    if a_first and a_first == a_swapped:
        return "win" if a_first == "a" else "loss"
    return "tie"


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """{task: prediction} of a predictions CSV (columns x, y_pred)."""
    rows = {}
    for line, row in enumerate(read_predictions_csv(path, {"x", "y_pred"}), start=2):
        task = task_text(row["x"])
        if task in rows:
            raise DataFormatError(f"{path}, line {line}: the prompt occurs twice; pairing by prompt needs "
                                  "each once")
        rows[task] = row["y_pred"]
    return rows


@dataclass
class JudgeClient:
    """A chat completions endpoint: ``url`` ends in ``/v1`` (or wherever ``/chat/completions`` hangs)."""

    url: str
    model: str
    api_key: str | None = None
    max_tokens: int = 8
    retries: int = 4
    timeout: float = 120.0

    def ask(self, question: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": question}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", data=body,
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(min(30.0, 2.0 ** attempt))
                    continue
                raise GistError(f"the judge at {self.url} answered HTTP {e.code}: {detail}") from None
            # URLError, timeouts, a connection cut mid-reply
            except (OSError, http.client.HTTPException) as e:
                if attempt < self.retries:
                    time.sleep(min(30.0, 2.0 ** attempt))
                    continue
                raise GistError(f"cannot reach the judge at {self.url}: {e!r}") from None
            try:
                return json.loads(raw)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise GistError(f"the judge at {self.url} answered something that is not a chat completion: "
                                f"{raw[:300].decode(errors='replace')!r}") from None
        raise AssertionError("unreachable")


def judge(a_path, b_path, client: JudgeClient, out: str | os.PathLike, limit: int | None = None,
          concurrency: int = 4, seed: int = 0) -> dict:
    """Judge every prompt the two CSVs share (or ``limit`` of them, drawn with ``seed``); write one
    row per record to ``out`` (refusing to overwrite) and return the summary (also in ``out``.json).
    Replies are kept in :func:`journal_path` as they arrive: a run that fails or is killed part way
    resumes when the same command is run again, asking only what is missing."""
    out = Path(out)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1; got {limit}")
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    a, b = read_predictions(a_path), read_predictions(b_path)
    tasks = [t for t in a if t in b]
    if not tasks:
        raise DataFormatError(f"{a_path} and {b_path} share no prompt; are they predictions of the same "
                              "split?")
    if limit is not None and limit < len(tasks):
        tasks = random.Random(seed).sample(tasks, limit)
    questions = [QUESTION.format(task=t, first=first, second=second)
                 for t in tasks for first, second in ((a[t], b[t]), (b[t], a[t]))]
    replies = _ask_all(client, questions, journal_path(out), concurrency)
    rows = []
    for i, task in enumerate(tasks):
        raw_ab, raw_ba = replies[2 * i], replies[2 * i + 1]
        v_ab, v_ba = parse_verdict(raw_ab), parse_verdict(raw_ba)
        rows.append({"x": task, "a": a[task], "b": b[task], "verdict_ab": v_ab or "",
                     "verdict_ba": v_ba or "", "outcome": combine(v_ab, v_ba), "raw_ab": raw_ab,
                     "raw_ba": raw_ba})
    summary = summarize([r["outcome"] for r in rows], seed)
    summary.update(a=str(a_path), b=str(b_path), judge_url=client.url, judge_model=client.model,
                   unparsed=sum(not r["verdict_ab"] for r in rows) + sum(not r["verdict_ba"] for r in rows),
                   questions=len(questions))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out, buf.getvalue())
    write_text_atomic(out.with_suffix(out.suffix + ".json"), json.dumps(summary, indent=1))
    journal_path(out).unlink(missing_ok=True)
    return summary


def journal_path(out: str | os.PathLike) -> Path:
    """Where a judge run keeps every reply as it arrives (``<out>.replies.jsonl``), until ``out`` is
    written."""
    out = Path(out)
    return out.with_suffix(out.suffix + ".replies.jsonl")


def _question_key(client, question: str) -> str:
    # a reply is reused only for the same question, instructions and settings to the same judge model
    # at the same endpoint
    settings = [client.url, client.model, SYSTEM, getattr(client, "max_tokens", None), question]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _ask_all(client, questions: list[str], journal: Path, concurrency: int) -> list[str]:
    """Every question's reply, each asked once: replies in ``journal`` from an earlier, interrupted
    run are reused; new ones are appended as they arrive, so a failed request or a killed run loses
    nothing received. A request that still fails after the client's retries does not stop the
    others; at the end the run fails, saying how to resume."""
    known: dict[str, str] = {}
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                known[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed run: that question is asked again
    keys = [_question_key(client, q) for q in questions]
    todo = {k: q for k, q in zip(keys, questions) if k not in known}
    failed: list[str] = []
    if todo:
        cut_short = (journal.is_file() and not journal.read_bytes().endswith(b"\n")
                     and journal.stat().st_size > 0)
        pool = ThreadPoolExecutor(max(1, concurrency))
        try:
            with open(journal, "a", encoding="utf-8") as f:
                if cut_short:  # end the cut line, so the next entry starts on its own
                    f.write("\n")
                futures = {pool.submit(client.ask, q): k for k, q in todo.items()}
                for future in as_completed(futures):
                    try:
                        reply = future.result()
                    except Exception as e:  # noqa: BLE001 - any failure of one request: the others go on
                        failed.append(str(e) or repr(e))
                        continue
                    known[futures[future]] = reply
                    f.write(json.dumps({"key": futures[future], "reply": reply}) + "\n")
                    f.flush()
        finally:  # interrupted (Ctrl-C): ask nothing more; what arrived is in the journal
            pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        raise GistError(f"{len(failed)} of {len(todo)} judge requests failed (first: {failed[0]}); the "
                        f"{len(todo) - len(failed)} replies received are kept in {journal}: run the same "
                        "command again to ask only the rest")
    return [known[k] for k in keys]


def summarize(outcomes: list[str], seed: int = 0) -> dict:
    n = len(outcomes)
    out = {"records": n}
    for name in ("win", "tie", "loss"):
        hits = [1.0 if o == name else 0.0 for o in outcomes]
        out[f"{name}_rate"] = sum(hits) / n
        out[f"{name}_interval"] = bootstrap_interval(hits, seed=seed)
    half = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]
    out["win_rate_ties_half"] = sum(half) / n
    out["win_rate_ties_half_interval"] = bootstrap_interval(half, seed=seed)
    return out


def judge_main(argv: list[str]) -> None:
    from argparse import ArgumentParser

    parser = ArgumentParser(prog="gist-lightning judge", description="Pairwise comparison of two prediction "
                            "CSVs by a judge model behind any OpenAI-compatible endpoint, both orders per "
                            "record (position bias cancels): win / tie / loss rates of A against B with "
                            "bootstrap 95%% intervals.")
    parser.add_argument("--a", required=True, help="predictions CSV of system A (columns x, y_pred)")
    parser.add_argument("--b", required=True, help="predictions CSV of system B, e.g. pos_control")
    parser.add_argument("--url", required=True, help="the endpoint's base URL, e.g. https://api.openai.com/v1")
    parser.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key")
    parser.add_argument("--out", required=True, help="CSV of per-record verdicts (summary beside it, .json)")
    parser.add_argument("--limit", type=int, default=None, help="judge a random sample of this many records")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    cfg = parser.parse_args(argv)
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise GistError(f"no API key: set {cfg.api_key_env} (or name another variable with --api_key_env)")
    summary = judge(cfg.a, cfg.b, JudgeClient(cfg.url, cfg.model, key), cfg.out, cfg.limit, cfg.concurrency,
                    cfg.seed)
    lo, hi = summary["win_rate_ties_half_interval"]
    print(f"{summary['records']} records judged in both orders by {cfg.model}: A wins "
          f"{summary['win_rate']:.1%}, ties {summary['tie_rate']:.1%}, loses {summary['loss_rate']:.1%}; win "
          f"rate (ties half) {summary['win_rate_ties_half']:.1%} [95% CI {lo:.1%}, {hi:.1%}]; "
          f"{summary['unparsed']} of {summary['questions']} replies said neither A, B nor TIE (counted as "
          f"ties). Verdicts: {cfg.out}")
