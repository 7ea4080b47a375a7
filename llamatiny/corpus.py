"""
A small synthetic story corpus, generated from templates, for tests and the offline demo.

The stories are simple on purpose (a tiny model learns them in a minute on a CPU) but
varied enough to train a vocabulary and to tell a trained model from an untrained one.
Output is deterministic for a given seed.

    python -m llamatiny.corpus out.txt --num_stories 2000            # <|endoftext|> format
    python -m llamatiny.corpus out_dir --num_stories 2000 --shards 4 # data00.json ... like TinyStories
    python -m llamatiny.corpus other.txt --words other                # other names, places and objects
"""
import argparse
import json
import os
import random
import tarfile
import tempfile

# the words the templates fill in; OTHER_WORDS is the same kind of story about other characters, places and
# objects: a text unlike the default one, to fine-tune a model trained on that (tests/test_lora.py)
WORDS = {
    "names": ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Lucy", "Tim", "Zoe", "Jack"],
    "animals": ["cat", "dog", "bird", "bunny", "frog", "duck", "bear", "fox", "mouse", "fish"],
    "things": ["ball", "kite", "box", "hat", "book", "cake", "toy car", "flower", "drum", "boat"],
    "colors": ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft"],
    "places": ["park", "garden", "forest", "beach", "house", "yard", "lake", "hill"],
    "feelings": ["happy", "sad", "scared", "proud", "tired", "excited"],
    "verbs": ["play", "run", "jump", "sing", "dance", "swim", "read", "draw"],
}
OTHER_WORDS = {
    "names": ["Kofi", "Ingrid", "Ravi", "Yuki", "Olek", "Amara", "Pablo", "Nadia", "Thor", "Wren", "Ezra",
              "Juno"],
    "animals": ["camel", "owl", "goat", "whale", "turtle", "hedgehog", "llama", "otter", "parrot", "yak"],
    "things": ["lantern", "compass", "kettle", "violin", "scarf", "telescope", "wagon", "quilt", "map",
               "sled"],
    "colors": ["purple", "golden", "striped", "tiny", "huge", "fluffy", "silver", "orange"],
    "places": ["harbor", "desert", "mountain", "market", "meadow", "island", "castle", "village"],
    "feelings": ["curious", "grumpy", "brave", "sleepy", "silly", "calm"],
    "verbs": ["climb", "paint", "bake", "skate", "whistle", "knit", "fly", "hike"],
}
WORD_SETS = {"default": WORDS, "other": OTHER_WORDS}


def make_story(rng: random.Random, words: dict = WORDS) -> str:
    name, friend = rng.sample(words["names"], 2)
    animal, thing = rng.choice(words["animals"]), rng.choice(words["things"])
    color = rng.choice(words["colors"])
    place, verb = rng.choice(words["places"]), rng.choice(words["verbs"])
    feeling = rng.choice(words["feelings"])
    opening = rng.choice([
        f"Once upon a time, there was a little {animal} named {name}.",
        f"One day, a little {animal} named {name} went to the {place}.",
        f"There was a {color} {animal} called {name} who lived near the {place}.",
    ])
    middle = [
        f"{name} had a {color} {thing}. {name} loved to {verb} with the {thing} every day.",
        f"At the {place}, {name} met {friend}. {friend} wanted to {verb} too.",
        rng.choice([
            f"But the {thing} fell into the water and {name} felt {feeling}.",
            f"Then it started to rain, and {name} and {friend} ran under a tree.",
            f"{friend} asked, \"Can I have the {thing}?\" {name} said, \"Yes, we can share.\"",
        ]),
        rng.choice([
            f"{friend} helped {name} find the {thing} again.",
            f"They waited until the sun came out, and then they could {verb} again.",
            f"They took turns with the {thing} and laughed a lot.",
        ]),
    ]
    ending = rng.choice([
        f"{name} and {friend} were {feeling} and became best friends.",
        f"That night, {name} went to sleep with the {thing} and dreamed about the {place}.",
        "And they lived happily ever after.",
    ])
    return " ".join([opening] + middle[: rng.randint(2, 4)] + [ending])


def make_stories(num_stories: int, seed: int = 0, words: dict = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [make_story(rng, words) for _ in range(num_stories)]


def write_endoftext(path: str, stories: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for story in stories:
            f.write(story + "\n<|endoftext|>\n")


def json_record(story: str) -> dict:
    # a record shaped like TinyStories' own: the story, the words and features it was written to, a summary
    words = [w for kind in ("animals", "things", "verbs") for w in WORDS[kind] if f" {w}" in story][:3]
    return {"story": story, "instruction": {"prompt:": "", "words": words,
                                            "features": ["Dialogue"] if '"' in story else []},
            "summary": story.split(". ")[0] + ".", "source": "fixture"}


def write_json_shards(out_dir: str, stories: list[str], shards: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    per = -(-len(stories) // shards)
    for i in range(shards):
        chunk = [json_record(s) for s in stories[i * per : (i + 1) * per]]
        with open(os.path.join(out_dir, f"data{i:02d}.json"), "w", encoding="utf-8") as f:
            json.dump(chunk, f)


def write_tinystories_archive(path: str, stories: list[str], shards: int = 4) -> None:
    # the stories as TinyStories' archive is downloaded: dataNN.json shards in a .tar.gz
    with tempfile.TemporaryDirectory() as tmp:
        write_json_shards(tmp, stories, shards)
        with tarfile.open(path, "w:gz") as tar:
            for name in sorted(os.listdir(tmp)):
                tar.add(os.path.join(tmp, name), arcname=name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a .txt file, or a directory when --shards is given")
    parser.add_argument("--num_stories", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=0, help="write TinyStories-style dataNN.json shards")
    parser.add_argument("--words", choices=WORD_SETS, default="default",
                        help="other: the same stories about other characters, places and objects")
    args = parser.parse_args()
    stories = make_stories(args.num_stories, args.seed, WORD_SETS[args.words])
    if args.shards:
        write_json_shards(args.out, stories, args.shards)
    else:
        write_endoftext(args.out, stories)
    print(f"wrote {len(stories)} stories to {args.out}")
