"""Make the embedded suite's shipped assets (run once; the outputs are committed):

- ``gist_lightning/assets/suite_human.json``: the hand-written validation_human records below,
  with outputs computed by the suite's task functions (so none is mistyped);
- ``gist_lightning/assets/suite_tokenizer/``: a byte-level BPE tokenizer trained on the suite's
  training text and the human records, saved as an HF fast tokenizer.

    python experiments/make_suite_assets.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from gist_lightning.data.suite import TASKS, generate_suite, make_record
from gist_lightning.templates import continuation_text, instruction_text
from gist_lightning.tokens import PAD_TOKEN

ASSETS = Path(__file__).resolve().parents[1] / "gist_lightning" / "assets"

# (task, params, instruction as a person would write it, input words)
HUMAN = [
    ("copy", {}, "Please just echo back what I wrote.", "apple lion cup"),
    ("copy", {}, "Could you say that list back to me unchanged?", "rain star moon sun"),
    ("copy", {}, "I need these words exactly as they are.", "pen book"),
    ("reverse", {}, "Flip the order around for me.", "cat dog owl"),
    ("reverse", {}, "Read this back starting from the end.", "red blue green yellow"),
    ("reverse", {}, "Backwards, please.", "tree stone river"),
    ("first", {}, "Which one comes first here?", "mango pear plum"),
    ("first", {}, "Tell me just the opening word.", "chair door lamp table"),
    ("first", {}, "I only care about the very first one.", "sheep horse"),
    ("last", {}, "Which one is at the very end?", "snow wind cloud"),
    ("last", {}, "Tell me the final word and nothing else.", "gold pink gray"),
    ("last", {}, "What closes this list?", "fox mouse rabbit tiger"),
    ("count", {}, "How long is this list?", "apple banana cherry"),
    ("count", {}, "Tell me the number of words I typed.", "cup pen shoe clock book"),
    ("count", {}, "Count them for me, please.", "sun moon"),
    ("first_two", {}, "Just the opening pair of words, please.", "pear apple mango"),
    ("first_two", {}, "I only need the two words at the front.", "tiger cat lion dog"),
    ("swap_pair", {}, "Trade the places of the opening two words.", "window lamp door chair"),
    ("every_other", {}, "Keep the first, skip one, keep one, and so on.", "red blue green yellow black"),
    ("every_other", {}, "I want only the words in odd places.", "cat dog fox owl"),
    ("every_other", {}, "Drop the second word, the fourth word and so on.", "rain snow wind cloud sun moon"),
    ("rotate", {}, "Send the opening word to the back.", "apple lemon peach"),
    ("rotate", {}, "Shift everything left by one place, wrapping around.", "pen cup lamp shoe"),
    ("rotate", {}, "The first word should go last now.", "river tree stone"),
    ("drop_first", {}, "Leave out the opening word.", "owl fox cat"),
    ("drop_first", {}, "Everything but the first one, please.", "gold gray pink white"),
    ("drop_last", {}, "Cut off the final word.", "plum pear melon"),
    ("drop_last", {}, "I want the list minus its last item.", "table chair door book"),
    ("swap_ends", {}, "Trade places between the opening and closing words.", "sun rain snow"),
    ("swap_ends", {}, "The end word and the start word should change places.", "lion tiger horse sheep"),
    ("double", {}, "Echo every word right after itself.", "cat owl"),
    ("double", {}, "Make each item appear twice in a row.", "red gold pink"),
    ("swap_pair", {}, "The second word should come before the first one.", "cat banana pen"),
    ("drop_second", {}, "Leave out whatever is in position two.", "sun window cup"),
    ("drop_second", {}, "Cut the word that sits in second place.", "apple banana cherry moon"),
    ("first_two", {}, "Show me the opening two items only.", "moon star tree"),
    ("last_two", {}, "I only need the final pair of words.", "red blue green yellow"),
    ("last_two", {}, "Keep the two words at the end and nothing else.", "cat dog fox owl mouse"),
    ("remove", {"x": "dog"}, "Get rid of all the dog words.", "cat dog owl dog"),
    ("remove", {"x": "rain"}, "I don't want rain anywhere in there.", "sun rain cloud"),
    ("remove", {"x": "pen"}, "Take out each pen, keep everything else.", "pen cup pen book lamp"),
    ("replace", {"x": "cat", "y": "dog"}, "Wherever you see cat, write dog instead.", "cat owl cat"),
    ("replace", {"x": "red", "y": "blue"}, "Turn every red into blue.", "red green red yellow"),
    ("replace", {"x": "sun", "y": "moon"}, "Use moon in place of sun.", "sun star sun cloud"),
    ("contains", {"x": "apple"}, "Did I mention apple anywhere?", "pear apple plum"),
    ("contains", {"x": "lion"}, "Can you find lion in here?", "cat dog fox"),
    ("contains", {"x": "book"}, "Check whether book shows up.", "book pen cup"),
    ("contains", {"x": "snow"}, "Any snow in this list?", "rain wind sun"),
    ("put_first", {"x": "owl"}, "Bring owl to the front.", "cat dog owl fox"),
    ("put_first", {"x": "green"}, "I want green leading the list.", "red blue green"),
    ("append", {"x": "cat"}, "Stick cat onto the end.", "dog owl"),
    ("append", {"x": "moon"}, "Finish the list with moon.", "sun star cloud"),
    ("count_word", {"x": "dog"}, "How often do you see dog?", "dog cat dog owl"),
    ("count_word", {"x": "red"}, "Tell me the number of red words.", "red blue red red"),
    ("count_word", {"x": "pen"}, "How many pen entries are there?", "cup book lamp"),
    ("nth", {"n": "second"}, "Tell me the word in position two.", "apple pear plum mango melon"),
    ("nth", {"n": "third"}, "Which word sits in the third slot?", "cat dog owl fox lion"),
    ("nth", {"n": "fifth"}, "Grab the fifth one for me.", "red blue green yellow black white"),
    ("prepend", {"x": "sun"}, "Start the list off with sun.", "moon star"),
    ("prepend", {"x": "apple"}, "Stick apple in front of everything.", "pear plum"),
    ("after", {"x": "cat"}, "Which word follows cat?", "dog cat owl fox"),
    ("after", {"x": "red"}, "Tell me what's right behind red.", "blue red green"),
    ("after", {"x": "cup"}, "What word is next after cup?", "pen cup book lamp"),
    ("reverse", {}, "Turn this list back to front.", "one two three"),
]


def human_records() -> list[dict]:
    by_name = {t.name: t for t in TASKS}
    records = []
    for name, params, instruction, words in HUMAN:
        rec = make_record(by_name[name], instruction, params, words.split(), "human")
        rec["instruction"] = instruction
        records.append(rec)
    return records


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<s>", "</s>", PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=PAD_TOKEN)


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    human = human_records()
    (ASSETS / "suite_human.json").write_text(json.dumps(human, indent=1) + "\n")
    suite = generate_suite(seed=0)
    texts = []
    for rec in suite["train"] + human:
        # the pieces the templates tokenize separately (decoder-only wording; the encoder-decoder
        # source is a prefix of it)
        texts += [instruction_text(rec["instruction"]), continuation_text(rec["input"], encoder_decoder=False),
                  rec["output"]]
    tok = train_tokenizer(texts)
    tok.save_pretrained(ASSETS / "suite_tokenizer")
    print(f"wrote {len(human)} human records and a {len(tok)}-token tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
