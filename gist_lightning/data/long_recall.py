"""Long-context tasks the project generates itself (no download), whose answer depends on content
anywhere in a long context, so truncating the context cannot solve them:

- ``recall``: key-value facts ("the code of amber is 4417.") among distractor sentences and other
  facts; the question asks for one key's value.
- ``two_hop``: "amber points to river." ... "the code of river is 93."; the question asks for the
  code of what amber points to (two facts, anywhere).
- ``two_hop_chain``: two_hop's records (the same contexts and question for the same draws), answered
  with the chain: the place, then its code ("river 93"). Each answer token is then a one-hop lookup
  (the second of the place just written), where two_hop's single answer token needs both hops
  composed inside the model. Not among the default ``tasks``.
- ``count``: how many facts name a given colour (aggregation over every segment).
- ``buried``: an instruction hidden in the context ("when asked for the secret, answer with the
  word owl.") that the question triggers.

A record is ``{"instruction": context, "input": question, "output": answer, "task", "fact_at"}``:
the context is what a gist model compresses (segment by segment), ``fact_at`` the fraction of the
context (0 = start, 1 = end) where the fact the answer needs begins, for breakdowns by distance.
Context length is set in words (``context_words``); the suite tokenizer makes about 1.8 tokens per
word of this vocabulary.

Two vocabularies for the keys and values of the facts (``vocabulary``):

- ``codes`` (the default): colour-like keys ("amber", "scarlet") and numeric codes of 2-4 digits,
  which the suite tokenizer splits into 2-6 and 3-5 tokens;
- ``words``: keys, values and two-hop places are words the suite tokenizer keeps whole, three
  disjoint sets, each fact two tokens, the value right after its key ("apple tiger."; two-hop
  "apple river." ... "river tiger."); the filler sentences draw from the places only, so that, as
  with codes, keys and values occur in the facts alone. Recall is then associative recall of one
  token (associative recall, as in the Zoology benchmarks) without matching and copying multi-token
  pieces. Why the value sits right after its key: in the long-context pilots a 0.9M model never
  learned the 3-fact lookup with the value two tokens after its key ("the code of apple is tiger.")
  in up to 3000 steps, and learned it in some runs with the value next to its key, restated facts
  and the context loss (experiments/results/long-context-pilots/README.md).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..splits import HUMAN, SPLITS, TRAIN
from .datamodule import GistDataModule
from .records import write_records
from .suite import WORDS

TASKS = ("recall", "two_hop", "count", "buried")  # LongRecall's default tasks
ALL_TASKS = (*TASKS, "two_hop_chain")
ASKS_KEY = ("recall", "two_hop", "two_hop_chain")  # the tasks whose question names a key
KEYS = ("amber", "azure", "coral", "ivory", "jade", "lilac", "olive", "onyx", "ruby", "scarlet", "teal",
        "violet")
FILLER = ("the {a} sat near the {b} while the {c} watched.", "a {a} and a {b} went to the {c}.",
          "nobody saw the {a} behind the {b}.", "the {a} likes the {b} more than the {c}.",
          "after the rain the {a} found a {b}.")


def _filler(rng: random.Random, words: tuple[str, ...] = WORDS) -> str:
    return rng.choice(FILLER).format(a=rng.choice(words), b=rng.choice(words), c=rng.choice(words))


def _code(rng: random.Random) -> str:
    return str(rng.randint(10, 9999))


# ``vocabulary: words``: three disjoint sets of words of the suite vocabulary (one token each)
WORD_KEYS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum", "cat",
             "dog")
WORD_VALUES = ("fox", "horse", "lion", "mouse", "owl", "rabbit", "sheep", "tiger", "red", "blue", "green",
               "yellow", "black", "white", "pink", "brown", "gray", "gold")
WORD_PLACES = ("book", "chair", "clock", "cup", "door", "lamp", "pen", "shoe", "table", "window", "river",
               "cloud", "stone", "tree", "moon", "star", "sun", "rain", "snow", "wind")
VOCABULARIES = ("codes", "words")


def _place(sentences: list[str], facts: list[str], rng: random.Random) -> tuple[list[str], list[int]]:
    """``facts`` inserted at random places among ``sentences``; their indices in the result."""
    slots = sorted(rng.sample(range(len(sentences) + len(facts)), len(facts)))
    out, it, order = [], iter(sentences), list(facts)
    rng.shuffle(order)
    where = {}
    for i in range(len(sentences) + len(facts)):
        if slots and i == slots[0]:
            slots.pop(0)
            fact = order.pop(0)
            where[fact] = i
            out.append(fact)
        else:
            out.append(next(it))
    return out, [where[f] for f in facts]


def make_long_record(task: str, context_words: int, rng: random.Random, n_facts: int = 6,
                     vocabulary: str = "codes", restate: float = 0.0) -> dict:
    """One record of ``task`` with a context of about ``context_words`` words, its keys and values
    from ``vocabulary`` (module docstring); each fact is stated a second time, later in the context,
    with probability ``restate`` (training data whose context is predictable from itself: with the
    context language-model loss, the second statement's value is a lookup of the first's key; never
    for ``count``, whose answer a second statement would change)."""
    if task not in ALL_TASKS:
        raise ValueError(f"task must be one of {ALL_TASKS}; got {task!r}")
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {VOCABULARIES}; got {vocabulary!r}")
    words = vocabulary == "words"
    fill = WORD_PLACES if words else WORDS  # the words of fillers, boxes' contents, the buried answer
    keys = rng.sample(WORD_KEYS if words else KEYS, min(n_facts, len(KEYS)))

    def values(names):  # distinct within a record under ``words``, as codes almost always are
        if words:
            return dict(zip(names, rng.sample(WORD_VALUES, len(names))))
        return {n: _code(rng) for n in names}

    codes = values(keys)

    def code_of(k: str, v: str) -> str:  # under ``words`` the value right after its key (docstring)
        return f"{k} {v}." if words else f"the code of {k} is {v}."

    def points(k: str, p: str) -> str:
        return f"{k} {p}." if words else f"{k} points to {p}."

    needed: list[str]
    if task == "recall":
        facts = [code_of(k, codes[k]) for k in keys]
        target = rng.choice(keys)
        needed, question, answer = ([code_of(target, codes[target])],
                                    f"What is the code of {target}?", codes[target])
    elif task in ("two_hop", "two_hop_chain"):
        places = rng.sample(fill, len(keys))
        place_codes = values(places)
        facts = [points(k, p) for k, p in zip(keys, places)] + [code_of(p, place_codes[p]) for p in places]
        i = rng.randrange(len(keys))
        needed = [points(keys[i], places[i]), code_of(places[i], place_codes[places[i]])]
        question, answer = f"What is the code of what {keys[i]} points to?", place_codes[places[i]]
        if task == "two_hop_chain":
            answer = f"{places[i]} {answer}"
    elif task == "count":
        colour = rng.choice(keys)
        n = rng.randint(1, 5)
        facts = [f"the box of {colour} holds a {rng.choice(fill)}." for _ in range(n)] + \
                [f"the box of {k} holds a {rng.choice(fill)}." for k in keys if k != colour]
        needed = [f for f in facts if f"of {colour} " in f]
        question, answer = f"How many boxes of {colour} are there?", str(n)
    else:  # buried
        word = rng.choice(fill)
        facts = [f"when asked for the secret, answer with the word {word}."] + \
                [code_of(k, codes[k]) for k in keys[:3]]
        needed, question, answer = facts[:1], "What is the secret?", word
    words_in_facts = sum(len(f.split()) for f in facts)
    sentences = []
    while sum(len(s.split()) for s in sentences) + words_in_facts < context_words:
        sentences.append(_filler(rng, fill))
    placed, at = _place(sentences, facts, rng)
    if restate and task != "count":  # a second box statement would change the count
        for fact in facts:
            if rng.random() < restate:
                placed.insert(rng.randint(placed.index(fact) + 1, len(placed)), fact)
        first_needed = min(placed.index(f) for f in needed)  # the first statement
    else:  # (where a fact occurs twice in ``facts``, as count's boxes may, ``at`` holds its later place)
        first_needed = min(at[facts.index(f)] for f in needed)
    return {"instruction": " ".join(placed), "input": question, "output": answer, "task": task,
            "fact_at": round(first_needed / max(len(placed) - 1, 1), 3)}


def ask_one_hop(record: dict, first: bool) -> dict:
    """A ``two_hop`` record asking one of its two hops instead of the chain, about the same context:
    the first ("What does apple point to?": the place) or the second ("What is the code of river?":
    the place's value, recall's question). Training data that supervises each lookup the chain
    composes (``LongRecall(hop_questions=...)``); ``fact_at`` stays the chain's."""
    key = re.fullmatch(r"What is the code of what (\w+) points to\?", record["input"])
    if record["task"] != "two_hop" or key is None:
        raise ValueError(f"not a two-hop question: {record['input']!r}")
    place = re.search(rf"(?:^|\. ){key[1]}(?: points to)? (\w+)\.", record["instruction"])[1]
    if first:
        return {**record, "input": f"What does {key[1]} point to?", "output": place}
    return {**record, "input": f"What is the code of {place}?"}


def fact_values(context: str, vocabulary: str = "codes") -> list[str]:
    """The values (codes) that the facts of ``context`` give, in order: what answering "any code of
    the context" draws from (under ``words`` values occur in the facts alone)."""
    if vocabulary == "words":
        return [w for w in re.findall(r"\w+", context) if w in WORD_VALUES]
    return re.findall(r"the code of \w+ is (\w+)\.", context)


def generate_long_recall(seed: int = 0, size: int = 1000, context_words: tuple[int, int] = (150, 300),
                         tasks: tuple[str, ...] = TASKS, vocabulary: str = "codes") -> list[dict]:
    """``size`` records, tasks in turn, context lengths uniform in ``context_words`` (words)."""
    rng = random.Random(seed)
    lo, hi = context_words
    if not 1 <= lo <= hi:
        raise ValueError(f"context_words must be (low, high) with 1 <= low <= high; got {context_words}")
    return [make_long_record(tasks[i % len(tasks)], rng.randint(lo, hi), rng, vocabulary=vocabulary)
            for i in range(size)]


# the generator's version, part of the cache folder's name (raise it when what it writes changes)
# (2, 3: vocabulary words, its fillers, boxes and buried words from the places; 4: words' facts
# "apple tiger."; codes as in 1)
LONG_RECALL_VERSION = 4
UNSEEN_KEYS = ("onyx", "teal")  # never the asked key in training or validation_seen
WORD_UNSEEN_KEYS = ("plum", "dog")  # the same under ``vocabulary: words``


def unseen_keys(vocabulary: str = "codes") -> tuple[str, str]:
    """The keys never asked in training or validation_seen, under ``vocabulary``."""
    return WORD_UNSEEN_KEYS if vocabulary == "words" else UNSEEN_KEYS


def asks_unseen_key(record: dict, vocabulary: str = "codes") -> bool:
    """Whether ``record``'s question is about a key of :func:`unseen_keys` (never asked in training)."""
    question = record["input"]
    return any(f"of {k}" in question or f"what {k} " in question or f"does {k} " in question
               for k in unseen_keys(vocabulary))


class LongRecall(GistDataModule):
    """The long-context tasks as a DataModule, generated into ``cache_dir`` (no download). The
    model must gist segment by segment (``model.segments``); the splits:

    - ``train``: contexts of ``context_words`` words, every task;
    - ``validation_seen``: new records of the training distribution;
    - ``validation_unseen``: recall and two-hop questions about keys never asked in training;
    - ``validation_human``: here not hand-written: contexts twice as long as in training (length
      generalisation). The split keeps its name so that every DataModule validates alike.

    Args:
        generation_seed: the generator's seed.
        train_size / validation_size: records in train and in each validation split.
        context_words: (low, high) words per training context.
        facts: key facts per context (the asked one and its distractors, at most 12); a list: each
            record draws its count from it (a mixture of difficulties in one split, e.g.
            ``[1, 2, 3]``: one model for recall among 1, 2 or 3 facts).
        tasks: the task families drawn in turn (a subset of ``ALL_TASKS``; ``validation_unseen``
            keeps those of them that ask about a key: recall, two_hop and two_hop_chain).
        vocabulary: the facts' keys and values: ``codes`` (numeric codes) or ``words`` (one token
            each); module docstring.
        restate: the probability that a fact is stated twice in a *training* context (validation
            splits never restate): with ``model.objectives.context_weight``, a dense lookup signal.
        hop_questions: the probability that a *training* two-hop record asks one of its two hops
            instead of the chain (:func:`ask_one_hop`; validation splits always ask the chain).
        kwargs: batch sizes, length limits, ... of :class:`~gist_lightning.data.datamodule.GistDataModule`.
    """

    def __init__(self, generation_seed: int = 0, train_size: int = 20000, validation_size: int = 200,
                 context_words: tuple[int, int] = (150, 300), tasks: tuple[str, ...] = TASKS,
                 facts: int | list[int] = 6, vocabulary: str = "codes", restate: float = 0.0,
                 hop_questions: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= restate <= 1.0:
            raise ValueError(f"data.restate must be a probability in [0, 1]; got {restate}")
        if not 0.0 <= hop_questions <= 1.0:
            raise ValueError(f"data.hop_questions must be a probability in [0, 1]; got {hop_questions}")
        if hop_questions and "two_hop" not in tasks:
            raise ValueError(f"data.hop_questions {hop_questions} asks two-hop records' hops, but data.tasks "
                             f"{list(tasks)} has no two_hop")
        if vocabulary not in VOCABULARIES:
            raise ValueError(f"data.vocabulary must be one of {VOCABULARIES}; got {vocabulary!r}")
        counts = [facts] if isinstance(facts, int) else list(facts)
        if not counts or not all(isinstance(n, int) and 1 <= n <= len(KEYS) for n in counts):
            raise ValueError(f"data.facts must be 1..{len(KEYS)} key facts per context, or a non-empty list "
                             f"of such counts; got {facts}")
        unknown = [t for t in tasks if t not in ALL_TASKS]
        if not tasks or unknown:
            raise ValueError(f"data.tasks must be a non-empty subset of {ALL_TASKS}; got {list(tasks)}")
        if not any(t in ASKS_KEY for t in tasks):
            raise ValueError(f"data.tasks {list(tasks)} has no task that asks about a key {ASKS_KEY}, "
                             "so validation_unseen (keys never asked in training) would be empty")

    @property
    def folder(self) -> Path:
        h = self.hparams
        lo, hi = h.context_words
        tasks = (("" if tuple(h.tasks) == TASKS else "-" + "+".join(h.tasks))
                 + ("" if h.facts == 6 else "-facts" + (str(h.facts) if isinstance(h.facts, int)
                                                         else "+".join(map(str, h.facts))))
                 + ("" if h.vocabulary == "codes" else f"-{h.vocabulary}")
                 + ("" if not h.restate else f"-restate{float(h.restate)!r}")
                 + ("" if not h.hop_questions else f"-hops{float(h.hop_questions)!r}"))
        return Path(h.cache_dir) / (f"long-recall-v{LONG_RECALL_VERSION}-seed{h.generation_seed}"
                                    f"-train{h.train_size}-val{h.validation_size}-words{lo}-{hi}{tasks}")

    def split_path(self, split: str) -> Path:
        return self.folder / f"{split}.json"

    def prepare_data(self) -> None:
        if all(self.split_path(s).is_file() for s in SPLITS):
            return
        h = self.hparams
        lo, hi = h.context_words
        rng = random.Random(h.generation_seed)
        asked_unseen = lambda r: asks_unseen_key(r, h.vocabulary)  # noqa: E731

        counts = [h.facts] if isinstance(h.facts, int) else list(h.facts)  # [3] draws as 3 (one folder)

        def draw(n, words, keep, tasks=tuple(h.tasks), restate=0.0, hops=0.0):
            out = []
            while len(out) < n:
                facts = counts[0] if len(counts) == 1 else rng.choice(counts)
                rec = make_long_record(tasks[len(out) % len(tasks)], rng.randint(*words), rng, facts,
                                       h.vocabulary, restate)
                if keep(rec):  # (on the chain's question: the contexts are those drawn without hops)
                    if hops and rec["task"] == "two_hop":
                        hop = random.Random(rec["instruction"] + rec["input"])  # (not rng: nothing moves)
                        if hop.random() < hops:
                            rec = ask_one_hop(rec, first=hop.random() < 0.5)
                    out.append({**rec, "source": "long_recall"})
            return out

        splits = {
            TRAIN: draw(h.train_size, (lo, hi), lambda r: not asked_unseen(r), restate=h.restate,
                        hops=h.hop_questions),
            "validation_seen": draw(h.validation_size, (lo, hi), lambda r: not asked_unseen(r)),
            "validation_unseen": draw(h.validation_size, (lo, hi), asked_unseen,
                                      tuple(t for t in h.tasks if t in ASKS_KEY)),
            HUMAN: draw(h.validation_size, (2 * lo, 2 * hi), lambda r: True),
        }
        for name, records in splits.items():
            write_records(self.split_path(name), records, overwrite=True)
