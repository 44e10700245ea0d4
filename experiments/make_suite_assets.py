"""Make the embedded suite's shipped assets (run once; the outputs are committed):

- ``gist_lightning/assets/suite_human.json``: the hand-written validation_human records below,
  with outputs computed by the suite's task functions (so none is mistyped);
- ``gist_lightning/assets/suite_tokenizer/``: a byte-level BPE tokenizer trained on the suite's
  training text and the human records, saved as an HF fast tokenizer.

    python experiments/make_suite_assets.py              # the human records only
    python experiments/make_suite_assets.py --tokenizer  # and a new tokenizer (changes every token id)

The shipped tokenizer was trained on the suite and the first 64 human records of version 0.1; the
later wordings (issue 14) are tokenized with it as they are (byte-level BPE covers any text).
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
    # written later (issue 14), to make the split large enough to measure: the same families, other people's
    # words
    ("copy", {}, "Leave the list alone and give it back to me.", "owl lamp"),
    ("copy", {}, "Write out my words again, same order, no changes.", "pear cup sun rain"),
    ("copy", {}, "Just say it back.", "tiger moon"),
    ("copy", {}, "Return exactly what you were given.", "book stone river clock"),
    ("reverse", {}, "Can you give me these in the opposite order?", "apple cup owl"),
    ("reverse", {}, "Last word first, first word last, and the middle flipped too.", "red pen sun moon"),
    ("reverse", {}, "I want the list read from right to left.", "snow horse lemon"),
    ("reverse", {}, "Write it all out from the end to the start.", "door chair lamp pen cup"),
    ("first", {}, "What word opens the list?", "melon cat book"),
    ("first", {}, "Just tell me the front word.", "stone star"),
    ("first", {}, "The very first item, nothing more.", "lion sheep tree pink"),
    ("first", {}, "Which item leads?", "clock shoe"),
    ("last", {}, "What word is at the back of the list?", "pear owl blue"),
    ("last", {}, "Just the final item, please.", "rain wind snow cloud"),
    ("last", {}, "How does the list end?", "cup book"),
    ("last", {}, "Name only the word that comes at the very end.", "fox lamp yellow"),
    ("count", {}, "How many items did I give you?", "cat dog"),
    ("count", {}, "Tell me the length of this list.", "sun moon star tree"),
    ("count", {}, "What is the number of words here?", "pen cup shoe"),
    ("count", {}, "Count the items in my list, please.", "apple pear plum lemon mango"),
    ("first_two", {}, "Only the two words at the start, please.", "red blue green"),
    ("first_two", {}, "Give me the front pair.", "owl fox cat lion"),
    ("first_two", {}, "Keep the opening two and drop the rest.", "cup pen book lamp"),
    ("last_two", {}, "Just the closing pair of words.", "sun rain snow"),
    ("last_two", {}, "Give me the two items at the back.", "cat owl dog fox"),
    ("last_two", {}, "Keep the final two and drop the rest.", "pear plum apple mango lemon"),
    ("every_other", {}, "Take the first, skip the next, take the one after, and so on.", "a b c d e"),
    ("every_other", {}, "Only the words in places one, three, five.", "red blue green yellow black"),
    ("every_other", {}, "Skip every word in an even place.", "cat dog owl fox"),
    ("every_other", {}, "Keep one, drop one, all the way through.", "sun moon star cloud rain"),
    ("rotate", {}, "Take the opening word and put it at the back.", "cup pen lamp"),
    ("rotate", {}, "Shift all words one place left; the first goes last.", "owl cat dog fox"),
    ("rotate", {}, "Move the front word to the very end.", "apple pear plum"),
    ("drop_first", {}, "Give me the list minus its opening word.", "moon sun star"),
    ("drop_first", {}, "Skip the first one and give me the rest.", "red blue green yellow"),
    ("drop_first", {}, "All of it except the front word.", "cat dog owl"),
    ("drop_last", {}, "Give me the list minus its final word.", "cup pen book"),
    ("drop_last", {}, "Skip the last one and give me the rest.", "rain snow wind cloud"),
    ("drop_last", {}, "All of it except the word at the back.", "lion tiger sheep"),
    ("drop_second", {}, "Take out whatever sits in slot two.", "owl fox cat lion"),
    ("drop_second", {}, "Everything but the second word, please.", "apple pear plum"),
    ("drop_second", {}, "Leave the second item out and keep the rest.", "sun moon star tree"),
    ("swap_ends", {}, "Exchange the front word and the back word.", "cat dog owl"),
    ("swap_ends", {}, "Put the first word at the end and the last word at the start.",
     "red blue green yellow"),
    ("swap_ends", {}, "Trade places between the words at both ends.", "pen cup book lamp"),
    ("swap_pair", {}, "Switch places of the first and second words.", "sun moon star"),
    ("swap_pair", {}, "The opening two words should trade places.", "apple cup pear lemon"),
    ("swap_pair", {}, "Put word two before word one.", "owl cat"),
    ("double", {}, "Write every word two times in a row.", "sun moon"),
    ("double", {}, "Give me each item twice.", "cat dog owl"),
    ("double", {}, "Say everything twice, word by word.", "red pen"),
    ("remove", {"x": "cat"}, "Please take all the cat words out.", "cat owl cat dog"),
    ("remove", {"x": "sun"}, "I want the list without any sun.", "sun moon sun star"),
    ("remove", {"x": "book"}, "Delete book wherever it shows up.", "pen book cup"),
    ("remove", {"x": "red"}, "Leave out every red and keep the rest.", "red blue red green"),
    ("replace", {"x": "dog", "y": "cat"}, "Every dog should become cat.", "dog owl dog"),
    ("replace", {"x": "pen", "y": "cup"}, "Put cup wherever pen is.", "pen book pen"),
    ("replace", {"x": "moon", "y": "star"}, "Change all moon words to star.", "sun moon rain moon"),
    ("replace", {"x": "apple", "y": "pear"}, "Swap out apple and put pear in its place.",
     "apple lemon apple"),
    ("contains", {"x": "cat"}, "Is there a cat somewhere in here?", "dog cat owl"),
    ("contains", {"x": "pen"}, "Do you see pen in my list?", "cup book lamp"),
    ("contains", {"x": "rain"}, "Tell me yes or no: does rain appear?", "rain sun"),
    ("contains", {"x": "lion"}, "Check my words for lion.", "tiger lion sheep"),
    ("put_first", {"x": "cat"}, "Move cat to the very front.", "dog owl cat"),
    ("put_first", {"x": "sun"}, "Let sun come first, the rest after it.", "moon star sun"),
    ("put_first", {"x": "pen"}, "Start with pen and keep the others in order.", "cup pen book"),
    ("append", {"x": "owl"}, "Add owl as the final word.", "cat dog"),
    ("append", {"x": "rain"}, "Put rain at the back of the list.", "sun snow"),
    ("append", {"x": "cup"}, "Tack cup onto the end, please.", "pen book lamp"),
    ("prepend", {"x": "owl"}, "Put owl at the front of everything.", "cat dog"),
    ("prepend", {"x": "star"}, "Begin with star, then my words.", "sun moon"),
    ("prepend", {"x": "cup"}, "Add cup as the first word.", "pen book"),
    ("count_word", {"x": "cat"}, "How many cat words do you see?", "cat dog cat owl cat"),
    ("count_word", {"x": "sun"}, "Count the times sun shows up, please.", "sun moon sun"),
    ("count_word", {"x": "pen"}, "How many times is pen in the list?", "cup pen book"),
    ("count_word", {"x": "rain"}, "Tell me how often rain is there.", "snow wind cloud"),
    ("nth", {"n": "third"}, "Give me word number three.", "cat dog owl fox lion"),
    ("nth", {"n": "fourth"}, "What sits in the fourth place?", "red blue green yellow black"),
    ("nth", {"n": "second"}, "Which word is second in line?", "sun moon star tree cloud"),
    ("nth", {"n": "first"}, "Tell me the item in place one.", "pen cup book lamp shoe"),
    ("after", {"x": "dog"}, "What is right after dog?", "cat dog owl"),
    ("after", {"x": "sun"}, "Give me the word that comes after sun.", "moon sun star rain"),
    ("after", {"x": "pen"}, "Which item follows pen in the list?", "pen cup book"),
    ("after", {"x": "red"}, "Name whatever comes next after red.", "blue red green"),
    ("first", {}, "Start of the list: which word is it?", "tree river stone"),
    ("last", {}, "End of the list: which word is it?", "tree river stone"),
    ("count", {}, "How many do we have here?", "cat owl fox lion"),
    ("reverse", {}, "Give the words to me in reverse, please.", "pen lamp cup"),
    ("copy", {}, "Say my list again exactly.", "sun rain cloud"),
    ("swap_ends", {}, "Switch the very first and the very last words.", "cat dog fox owl"),
    ("drop_first", {}, "Lose the opening word.", "apple pear plum mango"),
    ("drop_last", {}, "Lose the final word.", "apple pear plum mango"),
    ("rotate", {}, "The front word moves to the back.", "sun moon star"),
    ("double", {}, "Every item two times, please.", "pen cup"),
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
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token=PAD_TOKEN)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="write the suite's shipped assets")
    parser.add_argument("--tokenizer", action="store_true", help="also train and write a new tokenizer")
    args = parser.parse_args(argv)
    ASSETS.mkdir(parents=True, exist_ok=True)
    human = human_records()
    (ASSETS / "suite_human.json").write_text(json.dumps(human, indent=1) + "\n")
    if not args.tokenizer:
        print(f"wrote {len(human)} human records to {ASSETS}")
        return
    suite = generate_suite(seed=0)
    texts = []
    for rec in suite["train"] + human:
        # the pieces the templates tokenize separately (decoder-only wording; the encoder-decoder
        # source is a prefix of it)
        texts += [instruction_text(rec["instruction"]),
                  continuation_text(rec["input"], encoder_decoder=False), rec["output"]]
    tok = train_tokenizer(texts)
    tok.save_pretrained(ASSETS / "suite_tokenizer")
    print(f"wrote {len(human)} human records and a {len(tok)}-token tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
