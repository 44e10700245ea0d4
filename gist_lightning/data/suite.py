"""The embedded task suite: a small instruction-following data set the project generates itself,
so the main job runs on any laptop with no download.

Each task family maps a list of words (the input) to an output, and is phrased by several
English paraphrases. Parametrised families carry content in the instruction itself ("remove
every cat"), so a model cannot solve them without reading the instruction. Splits mirror Alpaca+:

- ``train``: training paraphrases with training parameter values.
- ``validation_seen``: instruction strings that occur in train, with (instruction, input) pairs
  that do not.
- ``validation_unseen``: instruction strings never in train: held-out paraphrases, and training
  paraphrases with held-out parameter values. Held-out paraphrases use only words that appear
  in training instructions (tested), so they test compression, not vocabulary.
- ``validation_human``: hand-written records (``assets/suite_human.json``), worded unlike the
  templates.

:class:`EmbeddedSuite` is the DataModule that generates the splits into its cache folder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..splits import HUMAN, SPLITS
from .datamodule import GistDataModule
from .records import load_records, write_records

WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum "
    "cat dog fox horse lion mouse owl rabbit sheep tiger "
    "red blue green yellow black white pink brown gray gold "
    "book chair clock cup door lamp pen shoe table window "
    "river cloud stone tree moon star sun rain snow wind"
).split()
NUMBERS = "zero one two three four five six seven eight nine ten".split()
ORDINALS = ["first", "second", "third", "fourth", "fifth"]
# parameter values never used in training instructions (they still occur in training inputs,
# so an unseen instruction never holds a word the model has not met)
HELD_OUT_WORDS = ("plum", "tiger", "gold", "window", "wind")

# Inputs: 2-6 words (at least 5 for "the n-th word", whose ordinals go up to "fifth"). A word
# parameter is in the input 85% of the time (so "remove x" is not always a no-op, nor never
# one), half the time for the yes/no task "is x in the list?", and always where the task needs it
# ("what comes after x?", "put x first"); when present it occurs twice one time in three.
MIN_WORDS, MAX_WORDS, MIN_WORDS_ORDINAL = 2, 6, 5
P_PARAM_PRESENT, P_PARAM_PRESENT_YES_NO = 0.85, 0.5
PARAM_REPEATS = (1, 1, 2)
# unseen instructions: a parametrised family takes a held-out paraphrase half the time, and
# otherwise a held-out parameter word with a training paraphrase
P_HELD_OUT_PARAPHRASE = 0.5
# the generator's version, part of the cache folder's name: raise it whenever what generate_suite
# writes for a seed changes, so that splits cached by an earlier version are not read as this one's
SUITE_VERSION = 3


@dataclass(frozen=True)
class Task:
    name: str
    paraphrases: tuple[str, ...]  # the training wordings (each in frames)
    fn: Callable[..., list[str]]  # (words, *params) -> output words
    param: str | None = None  # None, "word", "two_words" or "ordinal"
    held_out: tuple[str, ...] = ()  # wordings never in training (validation_unseen), used bare

    @property
    def carries_content(self) -> bool:
        return self.param is not None


def _without(words, x):
    return [w for w in words if w != x]


def _move_first(words, x):
    return [x] + _without(words, x) + [x] * (words.count(x) - 1) if x in words else list(words)


# Each family's wordings: its training paraphrases (several verbs and phrasings, so that a model can
# learn the words a person might use), and three held out of training. Training instructions wrap a
# paraphrase in a frame (FRAMES) most of the time, so the wordings a model trains on are
# compositional, not a few fixed sentences. Three held-out sentences per family, not one: with one,
# validation_unseen held only 24 distinct sentences, and whether a seed generalised to each of them
# was most of the seed-to-seed spread (experiments/results/tiny-variance/). The two added later were
# written to carry a word or phrase the family's training wordings never use ("Grab", "Get rid of"),
# as most of the first ones do; held-out sentences that only swap a noun ("items" for "words") scored
# ~96 and made the split easier, not better. Known flaws, kept at this version so that the committed
# sweep reproduces (fix them with the next version): two barely bring anything new ("Write the words
# from the end to the start.", "Give the words with {x} added first."), and two can be read otherwise
# ("Tell me every second word." as words 2, 4, ...; "Stick the first word on the end." like append's
# "Stick {x} on the end.").
TASKS: tuple[Task, ...] = (
    Task("copy", ("Repeat the list.", "Copy the words.", "Write the list again.", "Echo the words.",
                  "Give the words back unchanged.", "Return the list as it is."), lambda w: w,
         held_out=("Say the words again.", "Tell me the words again.", "Keep every word as it is.")),
    Task("reverse", ("Reverse the list.", "Write the words in reverse order.", "Give the list backwards.",
                     "Flip the order of the words.", "Read the list from the end.",
                     "Put the words back to front."), lambda w: w[::-1],
         held_out=("Say the words from last to first.", "Tell me the list backwards.",
                   "Write the words from the end to the start.")),
    Task("first", ("What is the first word?", "Give the first item.", "Name the word at the start.",
                   "Which word comes first?", "Tell me the opening word.", "Give the word at the front."),
         lambda w: w[:1],
         held_out=("Say only the first word.", "Grab the opening word.", "Return the word at the start.")),
    Task("last", ("What is the last word?", "Give the last item.", "Name the word at the end.",
                  "Which word comes last?", "Tell me the closing word.", "Give the final word."),
         lambda w: w[-1:],
         held_out=("Say only the last word.", "Grab the closing word.", "Return the word at the end.")),
    Task("count", ("How many words are there?", "Count the words.", "Give the number of items.",
                   "How long is the list?", "Tell me how many words there are.",
                   "Give the length of the list."), lambda w: [NUMBERS[len(w)]],
         held_out=("Say the number of words in the list.", "Name the number of words.",
                   "Check how many items the list has.")),
    Task("first_two", ("Give the first two words.", "Say the two items at the start.",
                       "Keep only the first two words.", "Give the opening two words.",
                       "Keep the two words at the front.", "Tell me the first pair of words."),
         lambda w: w[:2],
         held_out=("Name the first two items.", "Grab the first pair of words.", "Return the opening pair.")),
    Task("every_other", ("Give every other word.", "Keep every second item, starting with the first.",
                         "Skip every second word.", "Keep the words in odd places.",
                         "Take one word, skip one, and so on.", "Drop the words in even places."),
         lambda w: w[::2],
         held_out=("Say every other item.", "Tell me every second word.", "Return the words in odd places.")),
    Task("rotate", ("Move the first word to the end.", "Rotate the list by one.",
                    "Put the first item at the end of the list.", "Send the first word to the back.",
                    "Shift the list left by one.", "Move the opening word to the end."),
         lambda w: w[1:] + w[:1],
         held_out=("Move the first item to the end of the list.", "Stick the first word on the end.",
                   "Take the first item and put it at the end.")),
    Task("drop_first", ("Remove the first word.", "Drop the first item.",
                        "Give the list without its first word.", "Leave out the first word.",
                        "Cut the opening word.", "Give everything except the first word."), lambda w: w[1:],
         held_out=("Give the words without the first item.", "Skip the first word.",
                   "Get rid of the opening word.")),
    Task("drop_last", ("Remove the last word.", "Drop the last item.", "Give the list without its last word.",
                       "Leave out the last word.", "Cut the final word.",
                       "Give everything except the last word."), lambda w: w[:-1],
         held_out=("Give the words without the last item.", "Skip the last word.",
                   "Get rid of the final word.")),
    Task("swap_ends", ("Swap the first and last words.", "Exchange the first item and the last item.",
                       "Switch the words at the start and the end.", "Trade the first and last words.",
                       "Swap the opening and closing words.", "Exchange the words at both ends."),
         lambda w: w[-1:] + w[1:-1] + w[:1] if len(w) > 1 else list(w),
         held_out=("Put the last word first and the first word last.",
                   "Put the last word at the front and the first word at the end.",
                   "Swap the words at the front and the back.")),
    Task("double", ("Say each word twice.", "Repeat every word two times.", "Write each item two times.",
                    "Echo each word after itself.", "Make every word appear twice.",
                    "Give each item two times in a row."), lambda w: [x for x in w for _ in (0, 1)],
         held_out=("Say every word two times.", "Tell me each word twice.", "Copy each item two times.")),
    Task("swap_pair", ("Swap the first two words.", "Exchange the first item and the second item.",
                       "Switch the first word and the second word.", "Trade the first two words.",
                       "Put the first word second.", "Swap the opening pair of words."),
         lambda w: w[1:2] + w[:1] + w[2:],
         held_out=("Put the second word first.", "Let the second word lead.",
                   "Put the first two words in reverse order.")),
    Task("drop_second", ("Remove the second word.", "Drop the second item.",
                         "Give the list without its second word.", "Leave out the second word.",
                         "Cut the word in second place.", "Skip the second item."), lambda w: w[:1] + w[2:],
         held_out=("Give the words without the second item.", "Get rid of the second word.",
                   "Take out the word in second place.")),
    Task("last_two", ("Give the last two words.", "Say the two items at the end.",
                      "Keep only the last two words.", "Give the final two words.",
                      "Keep the two words at the back.", "Tell me the last pair of words."), lambda w: w[-2:],
         held_out=("Name the last two items.", "Grab the last pair of words.",
                   "Return the closing two words.")),
    Task("remove", ("Remove every {x}.", "Drop each {x} from the list.", "Give the list without {x}.",
                    "Take out every {x}.", "Get rid of each {x}.", "Delete all {x} words."), _without, "word",
         held_out=("Say the list without each {x}.", "Leave out every {x}.", "Skip each {x}.")),
    Task("replace", ("Replace every {x} with {y}.", "Change each {x} to {y}.",
                     "Write {y} where the list has {x}.", "Make each {x} a {y}.", "Swap each {x} for {y}.",
                     "Use {y} instead of {x}."), lambda w, x, y: [y if v == x else v for v in w], "two_words",
         held_out=("Write {y} in place of each {x}.", "Put {y} where the list has {x}.",
                   "Let {y} take the place of each {x}.")),
    Task("contains", ("Is {x} in the list?", "Does the list have {x}?", "Say yes if {x} is there, else no.",
                      "Can you find {x} in the list?", "Check if the list has {x}.",
                      "Does {x} show up in the words?"), lambda w, x: ["yes" if x in w else "no"], "word",
         held_out=("Is {x} in the words?", "Tell me if {x} is in the list.", "Does {x} appear in the list?")),
    Task("put_first", ("Put {x} first.", "Move {x} to the start.", "Give the list with {x} at the start.",
                       "Place {x} at the front.", "Let {x} lead the list.", "Move {x} to the front."),
         _move_first, "word",
         held_out=("Put {x} at the start of the list.", "Send {x} to the front.", "Shift {x} to the start.")),
    Task("append", ("Add {x} at the end.", "Put {x} after the last word.",
                    "Give the list with {x} added last.", "Place {x} at the end.", "Stick {x} on the end.",
                    "End the list with {x}."), lambda w, x: w + [x], "word",
         held_out=("Add {x} after the last item.", "Write {x} at the end.",
                   "Tell me the list with {x} added last.")),
    Task("count_word", ("How many times does {x} appear?", "Count each {x}.", "Give the number of {x} items.",
                        "How often does {x} appear?", "Tell me how many {x} words there are.",
                        "Count how many times {x} shows up."),
         lambda w, x: [NUMBERS[w.count(x)]], "word",
         held_out=("Say the number of {x} words.", "Name the number of {x} words.",
                   "Check how many times {x} shows up.")),
    Task("nth", ("What is the {n} word?", "Give the {n} item.", "Name the word in {n} place.",
                 "Which word is in {n} place?", "Tell me the {n} word.", "Grab the {n} item."),
         lambda w, n: w[ORDINALS.index(n): ORDINALS.index(n) + 1], "ordinal",
         held_out=("Say only the {n} word.", "Return the {n} word.", "Keep only the {n} word.")),
    Task("prepend", ("Add {x} at the start.", "Put {x} before the first word.",
                     "Give the list with {x} added first.", "Start the list with {x}.", "Stick {x} in front.",
                     "Begin the list with {x}."), lambda w, x: [x] + w, "word",
         held_out=("Add {x} before the first item.", "Write {x} before the first word.",
                   "Give the words with {x} added first.")),
    Task("after", ("What comes after {x}?", "Give the word after {x}.", "Name the item that follows {x}.",
                   "Which item comes after {x}?", "Tell me the word right after {x}.",
                   "What is the next word after {x}?"),
         lambda w, x: w[w.index(x) + 1: w.index(x) + 2] if x in w else ["none"], "word",
         held_out=("Name the word after {x}.", "Grab the word after {x}.", "Say which word follows {x}.")),
)

# Frames around a training paraphrase: {s} the paraphrase, {l} it with a lower-case first letter,
# {b} that without its final punctuation. Questions and requests take different frames.
FRAMES_REQUEST = ("{s}", "{s}", "Please {l}", "{s} Thanks.", "Now {l}", "I need you to {l}", "Could you {b}?",
                  "Task: {s}", "{s} Answer with the words only.")
FRAMES_QUESTION = ("{s}", "{s}", "Quick question: {s}", "{s} Answer in a few words.", "Tell me: {l}",
                   "Task: {s}", "Look at the list. {s}")


def frame(paraphrase: str, rng: random.Random) -> str:
    """A training wording: ``paraphrase`` in a frame drawn by ``rng``."""
    frames = FRAMES_QUESTION if paraphrase.endswith("?") else FRAMES_REQUEST
    lower = paraphrase[0].lower() + paraphrase[1:]
    return rng.choice(frames).format(s=paraphrase, l=lower, b=lower.rstrip(".?!"))


def training_wordings(task: Task) -> set[str]:
    """Every instruction string training can hold for ``task`` (each training paraphrase in every
    frame, with every training parameter value): the set a human-written or held-out instruction
    must stay out of."""
    out = set()
    for paraphrase in task.paraphrases:
        frames = FRAMES_QUESTION if paraphrase.endswith("?") else FRAMES_REQUEST
        lower = paraphrase[0].lower() + paraphrase[1:]
        for f in frames:
            text = f.format(s=paraphrase, l=lower, b=lower.rstrip(".?!"))
            for params in all_params(task):
                out.add(text.format(**params))
    return out


def all_params(task: Task) -> list[dict[str, str]]:
    """Every parameter setting training draws for ``task`` (held-out words left out), as the
    ``str.format`` keywords of its wordings: ``{"x": ...}``, ``{"x": ..., "y": ...}`` (two different
    words) or ``{"n": ...}`` (an ordinal); ``[{}]`` for a family without a parameter."""
    pool = [w for w in WORDS if w not in HELD_OUT_WORDS]
    if task.param is None:
        return [{}]
    if task.param == "ordinal":
        return [{"n": n} for n in ORDINALS]
    if task.param == "word":
        return [{"x": x} for x in pool]
    return [{"x": x, "y": y} for x in pool for y in pool if y != x]


def _params(task: Task, held_out: bool, rng: random.Random) -> dict[str, str]:
    if task.param is None:
        return {}
    if task.param == "ordinal":
        return {"n": rng.choice(ORDINALS)}
    pool = list(HELD_OUT_WORDS) if held_out else [w for w in WORDS if w not in HELD_OUT_WORDS]
    params = {"x": rng.choice(pool)}
    if task.param == "two_words":
        params["y"] = rng.choice([w for w in WORDS if w not in HELD_OUT_WORDS and w != params["x"]])
    return params


def _input(task: Task, params: dict[str, str], rng: random.Random) -> list[str]:
    n = rng.randint(MIN_WORDS_ORDINAL if task.param == "ordinal" else MIN_WORDS, MAX_WORDS)
    words = [rng.choice(WORDS) for _ in range(n)]
    x = params.get("x")
    if x is not None and task.name != "append" and task.name != "prepend":
        if task.name == "contains":
            present = rng.random() < P_PARAM_PRESENT_YES_NO
        elif task.name in ("after", "put_first"):
            present = True
        else:
            present = rng.random() < P_PARAM_PRESENT
        words = [w for w in words if w != x]
        while len(words) < MIN_WORDS:
            words.append(rng.choice([w for w in WORDS if w != x]))
        if present:
            # "after x" needs x before the last place, so it has a successor, and only once
            for _ in range(1 if task.name == "after" else rng.choice(PARAM_REPEATS)):
                pos = rng.randrange(len(words) - (1 if task.name == "after" else 0) + 1)
                pos = min(pos, len(words) - 1) if task.name == "after" else pos
                words.insert(pos, x)
    return words


def make_record(task: Task, paraphrase: str, params: dict[str, str], words: list[str], source: str) -> dict:
    args = [params[p] for p in ("x", "y", "n") if p in params]
    return {
        "instruction": paraphrase.format(**params),
        "input": " ".join(words),
        "output": " ".join(task.fn(words, *args)),
        "source": source,
    }


def generate_suite(seed: int = 0, train_size: int = 20000,
                   validation_size: int = 200) -> dict[str, list[dict]]:
    """The generated splits (``train``, ``validation_seen``, ``validation_unseen``), deterministic for
    ``seed``."""
    rng = random.Random(seed)
    train, seen_pairs, how = [], set(), {}  # how: instruction -> (task, paraphrase, params)
    while len(train) < train_size:
        task = rng.choice(TASKS)
        params = _params(task, held_out=False, rng=rng)
        paraphrase = frame(rng.choice(task.paraphrases), rng)
        rec = make_record(task, paraphrase, params, _input(task, params, rng), "suite")
        train.append(rec)
        seen_pairs.add((rec["instruction"], rec["input"]))
        how.setdefault(rec["instruction"], (task, paraphrase, params))

    seen, seen_keys = [], set()
    while len(seen) < validation_size:
        # an instruction as often as it occurs in train, so families weigh as they do in training
        task, paraphrase, params = how[rng.choice(train)["instruction"]]
        rec = make_record(task, paraphrase, params, _input(task, params, rng), "suite")
        key = (rec["instruction"], rec["input"])
        if key not in seen_pairs and key not in seen_keys:
            seen.append(rec)
            seen_keys.add(key)

    unseen, train_set = [], set(how)
    while len(unseen) < validation_size:
        task = rng.choice(TASKS)
        held_out_paraphrase = task.param in (None, "ordinal") or rng.random() < P_HELD_OUT_PARAPHRASE
        paraphrase = rng.choice(task.held_out if held_out_paraphrase else task.paraphrases)
        params = _params(task, held_out=not held_out_paraphrase, rng=rng)
        rec = make_record(task, paraphrase, params, _input(task, params, rng), "suite")
        if rec["instruction"] not in train_set:
            unseen.append(rec)
    return dict(zip(SPLITS, (train, seen, unseen)))


def human_records() -> list[dict]:
    """The hand-written validation_human records shipped with the package."""
    text = resources.files("gist_lightning").joinpath("assets/suite_human.json").read_text()
    return json.loads(text)


class EmbeddedSuite(GistDataModule):
    """The embedded task suite as a DataModule: generated into ``cache_dir`` once (at
    ``prepare_data``), with the shipped hand-written human split. No download.

    Args:
        generation_seed: the generator's seed (the data itself; ``seed`` orders the batches).
        train_size / validation_size: records in train and in each generated validation split.
        kwargs: batch sizes, length limits, ... of :class:`~gist_lightning.data.datamodule.GistDataModule`.
    """

    def __init__(
        self,
        generation_seed: int = 0,
        train_size: int = 20000,
        validation_size: int = 200,
        **kwargs,
    ):
        super().__init__(**kwargs)

    @property
    def folder(self) -> Path:
        h = self.hparams
        name = f"suite-v{SUITE_VERSION}-seed{h.generation_seed}-train{h.train_size}-val{h.validation_size}"
        return Path(h.cache_dir) / name

    def split_path(self, split: str) -> Path:
        return self.folder / f"{split}.json"

    def prepare_data(self) -> None:
        """Generate the splits into the cache folder (once; the folder names the generator's version),
        and copy the shipped human split there whenever the cached copy differs from it."""
        generated = [s for s in SPLITS if s != HUMAN]
        if not all(self.split_path(s).is_file() for s in generated):
            h = self.hparams
            splits = generate_suite(h.generation_seed, h.train_size, h.validation_size)
            for name in generated:
                write_records(self.split_path(name), splits[name], overwrite=True)
        human, path = human_records(), self.split_path(HUMAN)
        if not path.is_file() or load_records(path) != human:  # an edited asset is not served stale
            write_records(path, human, overwrite=True)
