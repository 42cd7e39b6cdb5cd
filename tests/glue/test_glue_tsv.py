"""The offline GLUE loader (iwtrainer.glue.tsv): the original TSV layout read into ``datasets``, real rows from
``../shared`` (else the embedded STS-B sample's) and synthetic MNLI/QQP files, and one-line errors naming the file,
row and flag."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import HAVE_GLUE_DIR, LOADER_ROWS, assert_one_line

from iwtrainer.glue.tasks import GLUE_TASKS, GlueDataError
from iwtrainer.glue.tsv import STSB_MAX_SCORE, STSB_MIN_SCORE, load_glue_from_dir


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header is not None else []) + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ real data
# The real rows: every task of ../shared (EXPECTED_ROWS), else the STS-B sample embedded in iwtrainer (SAMPLE_ROWS).

# Label counts of each classification split (a class index: its count) and STS-B's mean score, from the files.
LABEL_BALANCE = {
    ("rte", "validation"): {0: 146, 1: 131},  # 0 = entailment
    ("rte", "train"): {0: 1249, 1: 1241},
    ("qnli", "validation"): {0: 2702, 1: 2761},
    ("cola", "train"): {1: 6023, 0: 2528},  # 1 = acceptable
    ("cola", "validation"): {1: 721, 0: 322},
    ("sst2", "train"): {1: 37569, 0: 29780},
    ("sst2", "validation"): {1: 444, 0: 428},
    ("mrpc", "train"): {1: 2474, 0: 1194},  # 1 = equivalent
    ("mrpc", "validation"): {1: 279, 0: 129},
    ("wnli", "validation"): {0: 40, 1: 31},
    ("stsb", "validation"): 2.364,
    ("stsb", "train"): 2.701,
}
SAMPLE_LABEL_BALANCE = {  # awk -F'\t' 'NR>1 {s += $10} END {print s / (NR - 1)}' iwtrainer/glue/sample/STS-B/*.tsv
    ("stsb", "validation"): 2.4212,
    ("stsb", "train"): 2.57413,
}
# Rows as the files hold them: (task, split, row index) -> its values.
ROW_CONTENTS = {
    ("rte", "validation", 0): {"sentence2": "Christopher Reeve had an accident.", "label": 1},
    ("mrpc", "validation", 0): {  # unbalanced quote kept verbatim (QUOTE_NONE)
        "sentence2": '" The foodservice pie business does not fit our long-term growth strategy .',
        "label": 1,
    },
    ("cola", "train", 0): {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
    },
    ("cola", "test", 0): {"sentence": "Bill whistled past the house."},
    ("sst2", "train", 0): {"sentence": "hide new secretions from the parental units ", "label": 0, "idx": 0},
    ("stsb", "validation", 0): {"sentence1": "A man with a hard hat is dancing.", "label": 5.0},
    ("qnli", "validation", 0): {
        "question": "What came into force after the new constitution was herald?",
        "label": 0,
    },
}
SAMPLE_ROW_CONTENTS = {
    ("stsb", "validation", 0): {
        "sentence1": "A cat standing on tree branches.",
        "sentence2": "A black and white cat is high up on tree branches.",
        "label": 3.6,
        "idx": 0,
    },
    ("stsb", "validation", 17): {"sentence2": 'a woman is standing by a pillar where "u2" is written.'},  # quotes kept
    ("stsb", "train", 523): {"sentence1": 'A dog in a "superman" shirt sleeps on a blanket.', "label": 4.0},
    ("stsb", "train", 999): {"idx": 999},
}


@pytest.mark.parametrize("task", sorted(LOADER_ROWS))
def test_real_split_sizes_columns_and_features(real: dict[str, datasets.DatasetDict], task: str) -> None:
    dsd = real[task]
    spec = GLUE_TASKS[task]
    assert {split: ds.num_rows for split, ds in dsd.items()} == LOADER_ROWS[task]
    for split, ds in dsd.items():
        assert ds.column_names == [*spec.text_keys, "label", "idx"]
        assert ds["idx"] == list(range(ds.num_rows))
        if spec.is_regression:
            assert ds.features["label"] == datasets.Value("float32")
        else:
            assert ds.features["label"].names == list(spec.label_names)
        labels = np.asarray(ds["label"])
        if split == "test":
            assert (labels == -1).all()
        elif spec.is_regression:
            assert labels.min() >= 0.0 and labels.max() <= 5.0
        else:
            assert set(np.unique(labels)) <= set(range(spec.num_labels))


@pytest.mark.parametrize(
    ("task", "split", "expected"),
    [(*key, value) for key, value in (LABEL_BALANCE if HAVE_GLUE_DIR else SAMPLE_LABEL_BALANCE).items()],
)
def test_real_label_balance(real: dict[str, datasets.DatasetDict], task: str, split: str, expected) -> None:
    labels = real[task][split]["label"]
    if isinstance(expected, dict):
        assert Counter(labels) == expected
    else:
        assert np.mean(labels) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize(
    ("task", "split", "i", "values"),
    [(*key, value) for key, value in (ROW_CONTENTS if HAVE_GLUE_DIR else SAMPLE_ROW_CONTENTS).items()],
)
def test_real_row_contents(real: dict[str, datasets.DatasetDict], task: str, split: str, i: int, values) -> None:
    row = real[task][split][i]
    for key, value in values.items():
        assert row[key] == (pytest.approx(value) if isinstance(value, float) else value), key


# ---------------------------------------------------------------------------------------- synthetic MNLI/QQP

MNLI_TRAIN_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER[:-2]


def mnli_row(i: int, premise: str, hypothesis: str, labels: list[str]) -> list[str]:
    return [str(i), str(100 + i), f"{100 + i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)"] + [
        premise,
        hypothesis,
        *labels,
    ]


def test_mnli_from_standard_layout(tmp_path: Path) -> None:
    folder = tmp_path / "MNLI"
    write_tsv(
        folder / "train.tsv",
        MNLI_TRAIN_HEADER,
        [
            mnli_row(0, 'He said "hi.', "He spoke.", ["entailment", "entailment"]),
            mnli_row(1, "A cat sleeps.", "A dog barks.", ["neutral", "neutral"]),
            mnli_row(2, "It is day.", "It is night.", ["contradiction", "contradiction"]),
        ],
    )
    write_tsv(
        folder / "dev_matched.tsv",
        MNLI_DEV_HEADER,
        [mnli_row(0, "P0", "H0", ["neutral"] * 5 + ["neutral"]), mnli_row(1, "P1", "H1", ["contradiction"] * 6)],
    )
    write_tsv(folder / "dev_mismatched.tsv", MNLI_DEV_HEADER, [mnli_row(0, "P", "H", ["entailment"] * 6)])
    write_tsv(folder / "test_matched.tsv", MNLI_TEST_HEADER, [mnli_row(0, "TP", "TH", [])])
    write_tsv(
        folder / "test_mismatched.tsv", MNLI_TEST_HEADER, [mnli_row(0, "TP", "TH", []), mnli_row(1, "a", "b", [])]
    )

    dsd = load_glue_from_dir(str(tmp_path), "mnli")
    assert sorted(dsd) == ["test_matched", "test_mismatched", "train", "validation_matched", "validation_mismatched"]
    train = dsd["train"]
    assert train.column_names == ["premise", "hypothesis", "label", "idx"]
    assert train.features["label"].names == ["entailment", "neutral", "contradiction"]
    assert train["label"] == [0, 1, 2]
    assert train["premise"][0] == 'He said "hi.'
    assert dsd["validation_matched"]["label"] == [1, 2]
    assert dsd["validation_mismatched"]["label"] == [0]
    assert dsd["test_mismatched"]["label"] == [-1, -1] and dsd["test_mismatched"]["idx"] == [0, 1]


def test_mnli_dev_only(tmp_path: Path) -> None:
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", MNLI_DEV_HEADER, [mnli_row(0, "P", "H", ["neutral"] * 6)])
    assert list(load_glue_from_dir(tmp_path, "mnli")) == ["validation_mismatched"]


def test_qqp_from_standard_layout(tmp_path: Path) -> None:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(
        tmp_path / "QQP" / "train.tsv",
        header,
        [["0", "1", "2", "How?", "Why?", "0"], ["1", "3", "4", 'What is "x?', "What is x?", "1"]],
    )
    write_tsv(tmp_path / "QQP" / "dev.tsv", header, [["5", "6", "7", "A?", "", "1"]])
    write_tsv(tmp_path / "QQP" / "test.tsv", ["id", "question1", "question2"], [["0", "Q1?", "Q2?"]])
    dsd = load_glue_from_dir(str(tmp_path), "qqp")
    assert sorted(dsd) == ["test", "train", "validation"]
    assert dsd["train"].column_names == ["question1", "question2", "label", "idx"]
    assert dsd["train"].features["label"].names == ["not_duplicate", "duplicate"]
    assert dsd["train"]["label"] == [0, 1] and dsd["train"]["question1"][1] == 'What is "x?'
    assert dsd["validation"][0] == {"question1": "A?", "question2": "", "label": 1, "idx": 0}
    assert dsd["test"][0]["label"] == -1


# ------------------------------------------------------------------------------------------------ errors


def test_error_unknown_task(tmp_path: Path) -> None:
    assert issubclass(GlueDataError, ValueError)
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "squad")
    assert_one_line(exc, "--task_name", "'squad'", "rte", "sst2", "mnli")


def test_error_missing_glue_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(missing), "rte")
    assert_one_line(exc, "--glue_dir", str(missing), "RTE")
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir("", "rte")
    assert_one_line(exc, "--glue_dir")


def test_error_missing_task_folder(tmp_path: Path) -> None:
    (tmp_path / "CoLA").mkdir()
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "rte")
    assert_one_line(exc, "--glue_dir", str(tmp_path / "RTE"), "train.tsv", "dev.tsv")


def test_error_no_labelled_file(tmp_path: Path) -> None:
    write_tsv(tmp_path / "RTE" / "test.tsv", ["index", "sentence1", "sentence2"], [["0", "a", "b"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "rte")
    assert_one_line(exc, str(tmp_path / "RTE"), "train.tsv", "dev.tsv", "test.tsv")
    (tmp_path / "MNLI").mkdir()
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "mnli")
    assert_one_line(exc, "dev_matched.tsv", "dev_mismatched.tsv")


def test_error_missing_column(tmp_path: Path) -> None:
    path = write_tsv(
        tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "hypothesis", "label"], [["0", "a", "b", "entailment"]]
    )
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "rte")
    assert_one_line(exc, str(path), "'sentence2'", "'hypothesis'", "'label'")
    path = write_tsv(tmp_path / "MRPC" / "train.tsv", ["label", "#1 String", "#2 String"], [["1", "a", "b"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "mrpc")
    assert_one_line(exc, str(path), "'Quality'")


def test_error_missing_column_in_test_file(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [["good", "1"]])
    path = write_tsv(tmp_path / "SST-2" / "test.tsv", ["index", "text"], [["0", "meh"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "sst2")
    assert_one_line(exc, str(path), "'sentence'", "'text'")


def test_error_bad_label(tmp_path: Path) -> None:
    path = write_tsv(
        tmp_path / "RTE" / "train.tsv",
        ["index", "sentence1", "sentence2", "label"],
        [["0", "a", "b", "entailment"], ["1", "c", "d", "maybe"]],
    )
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "rte")
    assert_one_line(exc, str(path), "row 2", "'maybe'", "'entailment'", "'not_entailment'")
    path = write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [["good", "1"], ["bad", "2"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "sst2")
    assert_one_line(exc, str(path), "row 2", "'2'", "['0', '1']")


@pytest.mark.parametrize("score", ["abc", "5.5", "-0.1", "nan", ""])
def test_error_bad_stsb_score(tmp_path: Path, score: str) -> None:
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    row = ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A.", "B."]
    path = write_tsv(tmp_path / "STS-B" / "dev.tsv", header + ["score"], [row + ["3.2"], row + ["1"], row + [score]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "stsb")
    assert_one_line(exc, str(path), "row 3", repr(score), "[0, 5]")


def test_error_cola_column_count(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "CoLA" / "train.tsv", None, [["gj04", "1", "", "Fine."], ["The cat sat.", "1"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "cola")
    assert_one_line(exc, str(path), "line 2 has 2 tab-separated fields", "expected 4", "no header row")


def test_error_cola_with_header(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "CoLA" / "dev.tsv", ["source", "label", "mark", "sentence"], [["gj04", "1", "", "ok"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "cola")
    assert_one_line(exc, str(path), "row 1", "'label'", "without a header")


def test_error_ragged_rows(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label"]
    # every row one field too wide: pandas would silently turn the first column into the index
    path = write_tsv(tmp_path / "WNLI" / "train.tsv", header, [["0", "a", "b", "1", "x"], ["1", "a", "b", "1", "y"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "wnli")
    assert_one_line(exc, str(path), "line 2 has 5 tab-separated fields", "expected 4", "'sentence2'")
    # a short row must not become an empty label or sentence
    path = write_tsv(tmp_path / "WNLI" / "train.tsv", header, [["0", "a", "b", "1"], ["1", "a", "b"]])
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(str(tmp_path), "wnli")
    assert_one_line(exc, str(path), "line 3 has 3 tab-separated fields", "expected 4")


def test_blank_lines_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "RTE" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\r\n0\ta\tb\tentailment\r\n\r\n1\tc\td\tnot_entailment")
    ds = load_glue_from_dir(tmp_path, "rte")["validation"]
    assert ds["sentence1"] == ["a", "c"] and ds["label"] == [0, 1]


def test_label_mapping_and_whitespace(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "WNLI" / "dev.tsv", header, [["0", "a", "b", "1"], ["1", "c", "d", "0 "]])
    write_tsv(
        tmp_path / "QNLI" / "dev.tsv", ["index", "question", "sentence", "label"], [["0", "q", "s", "not_entailment"]]
    )
    assert load_glue_from_dir(tmp_path, "wnli")["validation"]["label"] == [1, 0]  # 1 = entailment
    qnli = load_glue_from_dir(tmp_path, "qnli")
    assert list(qnli) == ["validation"] and qnli["validation"]["label"] == [1]


def test_stsb_score_bounds():
    assert (STSB_MIN_SCORE, STSB_MAX_SCORE) == (0.0, 5.0)
