"""Loaders: embedded-format validation, user JSONL/CSV/datasets, oasst1 and HH-RLHF, summaries."""

import csv
import gzip
import json
import warnings

import pytest

from labkit import data as D


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prompt(i, split="sft", **kw):
    return {"id": f"{split}-{i:04d}", "prompt": f"Question number {i}?", "category": "open_qa",
            "style": "plain", "split": split, "checks": [], **kw}


# ----------------------------------------------------------------------------- prompt files

def test_load_prompts_user_file_defaults_and_split(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [prompt(1), "", prompt(2, "rm", harmful=True, source="template"),
                                           prompt(3, "rm", reference="Paris", checks=[{"type": "lowercase"}])])
    recs = D.load_prompts(path=f)
    assert [r["id"] for r in recs] == ["sft-0001", "rm-0002", "rm-0003"]
    assert recs[0]["harmful"] is False and recs[0]["source"] == "hand" and "reference" not in recs[0]
    assert recs[1]["harmful"] is True and recs[1]["source"] == "template"
    assert [r["id"] for r in D.load_prompts("rm", path=f)] == ["rm-0002", "rm-0003"]
    assert recs.stats == {"read": 3, "kept": 3}
    assert D.load_prompts("rm", path=f).stats == {"read": 3, "kept": 2}


def test_load_prompts_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [prompt(1)])
    write_jsonl(tmp_path / "b.jsonl", [prompt(2, "eval")])
    (tmp_path / "notes.txt").write_text("not data")
    assert [r["id"] for r in D.load_prompts(path=tmp_path)] == ["sft-0001", "eval-0002"]


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown split 'train'.*'sft', 'rm', 'ppo', 'eval'"):
        D.load_prompts("train")


@pytest.mark.parametrize("bad,field,message", [
    ({"prompt": None}, "prompt", "non-empty string"),
    ({"category": "poetry"}, "category", "unknown value 'poetry'"),
    ({"style": "fewshot"}, "style", "unknown value"),
    ({"split": "train"}, "split", "unknown value"),
    ({"checks": {"type": "lowercase"}}, "checks", "must be a list"),
    ({"checks": [{"type": "lowercase"}, {"type": "max_words"}]}, "checks", "check 1.*needs the parameter 'n'"),
    ({"checks": [{"type": "shout"}]}, "checks", "unknown check type 'shout'"),
    ({"reference": 42}, "reference", "non-empty string"),
    ({"harmful": "maybe"}, "harmful", "true or false"),
    ({"source": "scraped"}, "source", "unknown value"),
])
def test_malformed_prompt_names_file_line_field(tmp_path, bad, field, message):
    rec = {**prompt(2), **bad}
    f = write_jsonl(tmp_path / "broken.jsonl", [prompt(1), rec])
    with pytest.raises(ValueError, match=rf"broken\.jsonl:2: field '{field}': .*{message}"):
        D.load_prompts(path=f)


def test_missing_field_bad_json_and_duplicates(tmp_path):
    rec = prompt(1)
    del rec["style"]
    with pytest.raises(ValueError, match=r"m\.jsonl:1: field 'style': missing"):
        D.load_prompts(path=write_jsonl(tmp_path / "m.jsonl", [rec]))
    with pytest.raises(ValueError, match=r"j\.jsonl:3: invalid JSON"):
        D.load_prompts(path=write_jsonl(tmp_path / "j.jsonl", [prompt(1), "", '{"id": "x",']))
    with pytest.raises(ValueError, match=r"l\.jsonl:1: expected a JSON object, got list"):
        D.load_prompts(path=write_jsonl(tmp_path / "l.jsonl", ["[1, 2]"]))
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'id': duplicate id 'sft-0001' \(first at .*d\.jsonl:1\)"):
        D.load_prompts(path=write_jsonl(tmp_path / "d.jsonl", [prompt(1), prompt(1)]))


def test_load_demonstrations_join_and_errors(tmp_path):
    prompts = [prompt(1), prompt(2), prompt(3, "rm")]
    f = write_jsonl(tmp_path / "demos.jsonl", [{"prompt_id": "sft-0002", "response": "Two."},
                                               {"prompt_id": "rm-0003", "response": "Three."}])
    demos = D.load_demonstrations(path=f, prompts=prompts)
    assert demos == [{**prompts[1], "response": "Two."}]
    assert len(D.load_demonstrations(None, path=f, prompts=prompts)) == 2
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt_id": "sft-0001", "response": "One."},
                                                 {"prompt_id": "sft-0099", "response": "?"}])
    with pytest.raises(ValueError, match=r"u\.jsonl:2: field 'prompt_id': unknown prompt id 'sft-0099'"):
        D.load_demonstrations(path=unknown, prompts=prompts)
    twice = write_jsonl(tmp_path / "t.jsonl", [{"prompt_id": "sft-0001", "response": "One."}] * 2)
    with pytest.raises(ValueError, match=r"t\.jsonl:2: field 'prompt_id': second demonstration"):
        D.load_demonstrations(path=twice, prompts=prompts)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt_id": "sft-0001", "response": "  "}])
    with pytest.raises(ValueError, match=r"e\.jsonl:1: field 'response'"):
        D.load_demonstrations(path=empty, prompts=prompts)


# ----------------------------------------------------------------------------- user data

def test_load_jsonl_with_mapping_and_defaults(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"instruction": "Say hi.", "output": "Hi!"},
                                              {"instruction": "Classify: great film", "output": "positive",
                                               "category": "classification", "checks": [{"type": "lowercase"}]}])
    recs = D.load_jsonl(f, mapping={"prompt": "instruction", "response": "output"}, split="rm",
                        required=("prompt", "response"))
    assert recs[0] == {"id": "mine-0001", "prompt": "Say hi.", "response": "Hi!", "category": "other",
                       "style": "plain", "split": "rm", "checks": [], "harmful": False, "source": "hand"}
    assert recs[1]["category"] == "classification" and recs[1]["checks"] == [{"type": "lowercase"}]
    assert recs.stats == {"read": 2, "kept": 2}


def test_load_jsonl_errors_name_user_columns(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"instruction": "Say hi."}, {"question": "Oops"}])
    with pytest.raises(ValueError, match=r"mine\.jsonl:2: field 'instruction': missing"):
        D.load_jsonl(f, mapping={"prompt": "instruction"})
    g = write_jsonl(tmp_path / "cat.jsonl", [{"q": "Hi", "kind": "poetry"}])
    with pytest.raises(ValueError, match=r"cat\.jsonl:1: field 'kind': unknown value 'poetry'"):
        D.load_jsonl(g, mapping={"prompt": "q", "category": "kind"})
    h = write_jsonl(tmp_path / "resp.jsonl", [{"prompt": "Hi", "response": ""}])
    with pytest.raises(ValueError, match=r"resp\.jsonl:1: field 'response': missing or empty"):
        D.load_jsonl(h, required=("prompt", "response"))
    with pytest.raises(ValueError, match="unknown split"):
        D.load_jsonl(f, mapping={"prompt": "instruction"}, split="train")


def test_load_csv_with_mapping(tmp_path):
    f = tmp_path / "sheet.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "kind", "harmful", "checks"])
        w.writerow(["Name three fruits,\nplease.", "brainstorming", "false", '[{"type": "num_bullets", "n": 3}]'])
        w.writerow(["How do I pick a lock?", "", "TRUE", ""])
        w.writerow(["", "other", "", ""])
    mapping = {"prompt": "question", "category": "kind"}
    with pytest.raises(ValueError, match=r"sheet\.csv:5: field 'question': missing or empty"):
        D.load_csv(f, mapping=mapping)
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-1]) + "\n")
    recs = D.load_csv(f, mapping=mapping, split="ppo")
    assert recs[0]["prompt"] == "Name three fruits,\nplease." and recs[0]["category"] == "brainstorming"
    assert recs[0]["checks"] == [{"type": "num_bullets", "n": 3}] and recs[0]["harmful"] is False
    assert recs[1]["category"] == "other" and recs[1]["harmful"] is True and recs[1]["split"] == "ppo"
    assert [r["id"] for r in recs] == ["sheet-0003", "sheet-0004"]  # the physical line each row ends on
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,checks\nHi,"[{""type"": ""max_words""}]"\n')
    with pytest.raises(ValueError, match=r"bad\.csv:2: field 'checks': check 0.*'n'"):
        D.load_csv(bad)


def test_from_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"instruction": ["Say hi.", "Say bye."], "output": ["Hi!", "Bye!"],
                                     "id": ["a", "b"]})
    recs = D.from_dataset(ds, mapping={"prompt": "instruction", "response": "output"})
    assert [(r["id"], r["prompt"], r["response"], r["split"]) for r in recs] == [
        ("a", "Say hi.", "Hi!", "sft"), ("b", "Say bye.", "Bye!", "sft")]
    broken = datasets.Dataset.from_dict({"instruction": ["ok", ""]})
    with pytest.raises(ValueError, match=r"my_data:2: field 'instruction': missing or empty"):
        D.from_dataset(broken, mapping={"prompt": "instruction"}, name="my_data")


# ----------------------------------------------------------------------------- OpenAssistant

def oasst_messages():
    """Two trees: a root with 4 replies (one unranked, two tied), and a second turn with 2 replies."""
    m = lambda mid, parent, role, text, rank=None, **kw: {  # noqa: E731
        "message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en", **kw}
    return [
        m("p1", None, "prompter", "What is a good name for a cat?"),
        m("a1", "p1", "assistant", "Miso.", 1),
        m("a2", "p1", "assistant", "Pixel, because cats love screens.", 0),
        m("a3", "p1", "assistant", "Cat.", None),
        m("a4", "p1", "assistant", "Biscuit.", 1),
        m("p2", "a2", "prompter", "Another one?"),
        m("b1", "p2", "assistant", "Nova.", 0),
        m("b2", "p2", "assistant", "Zed.", 1),
        m("p3", None, "prompter", "Hola?", lang="es"),
        m("c1", "p3", "assistant", "Hola!", 0),
        m("c2", "p3", "assistant", "", 1),
        m("c3", "p3", "assistant", "Buenas.", 2, deleted=True),
    ]


def test_load_oasst_flat_records_and_counts():
    with pytest.warns(UserWarning, match=r"kept 2 records; skipped 1 unranked replies, 1 empty replies, 1 deleted replies, 1 prompts with under 2"):
        recs = D.load_oasst(oasst_messages())
    first, second = recs
    assert first["prompt"] == "What is a good name for a cat?" and first["prompt_id"] == "p1"
    assert first["responses"] == ["Miso.", "Pixel, because cats love screens.", "Biscuit."]
    assert first["tiers"] == [[1], [0, 2]]
    assert second["prompt"] == ("Human: What is a good name for a cat?\n\n"
                                "Assistant: Pixel, because cats love screens.\n\nHuman: Another one?")
    assert second["responses"] == ["Nova.", "Zed."] and second["tiers"] == [[0], [1]]
    assert recs.stats == {"messages": 12, "skipped_unranked_replies": 1, "skipped_deleted_replies": 1,
                          "skipped_empty_replies": 1, "skipped_prompts_with_under_2_ranked_replies": 1,
                          "kept": 2}


def test_load_oasst_file_gz_lang_and_tree(tmp_path):
    f = tmp_path / "oasst.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write("".join(json.dumps(m) + "\n" for m in oasst_messages()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r["prompt_id"] for r in D.load_oasst(f)] == ["p1", "p2"]
        assert D.load_oasst(oasst_messages(), lang="es") == []
    msgs = {m["message_id"]: {k: v for k, v in m.items() if k != "parent_id"} for m in oasst_messages()[:8]}
    tree = {"message_tree_id": "p1", "prompt": {**msgs["p1"], "replies": [
        msgs["a1"], {**msgs["a2"], "replies": [{**msgs["p2"], "replies": [msgs["b1"], msgs["b2"]]}]},
        msgs["a3"], msgs["a4"]]}}
    with pytest.warns(UserWarning):
        from_tree = D.load_oasst([tree])
    with pytest.warns(UserWarning):
        flat = D.load_oasst(oasst_messages()[:8])
    assert list(from_tree) == list(flat)


def test_load_oasst_malformed(tmp_path):
    msgs = oasst_messages()
    msgs[3] = {**msgs[3], "role": "user"}
    f = write_jsonl(tmp_path / "tree.jsonl", msgs)
    with pytest.raises(ValueError, match=r"tree\.jsonl:4: field 'role': expected 'prompter' or 'assistant'"):
        D.load_oasst(f)
    msgs = oasst_messages()
    del msgs[1]["text"]
    with pytest.raises(ValueError, match=r"records:2: field 'text'"):
        D.load_oasst(msgs)
    msgs = oasst_messages()
    msgs[2]["rank"] = "best"
    with pytest.raises(ValueError, match=r"records:3: field 'rank'"):
        D.load_oasst(msgs)


# ----------------------------------------------------------------------------- HH-RLHF

HH = [
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for 9 minutes, then cool it in cold water.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are great."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."},
]


def test_load_hh_rlhf(tmp_path):
    recs = D.load_hh_rlhf(write_jsonl(tmp_path / "hh.jsonl", HH))
    assert recs[0] == {"prompt": "How do I boil an egg?", "chosen": "Simmer it for 9 minutes, then cool it in cold water.",
                       "rejected": "Eggs are great.", "responses": [recs[0]["chosen"], "Eggs are great."],
                       "tiers": [[0], [1]]}
    assert recs[1]["prompt"] == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    assert (recs[1]["chosen"], recs[1]["rejected"]) == ("Why did the chicken cross the road?", "No.")
    assert recs.stats == {"read": 2, "kept": 2}


def test_load_hh_rlhf_malformed(tmp_path):
    no_assistant = {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"}
    f = write_jsonl(tmp_path / "hh.jsonl", [HH[0], no_assistant])
    with pytest.raises(ValueError, match=r"hh\.jsonl:2: field 'chosen': no '\\n\\nHuman:' turn"):
        D.load_hh_rlhf(f)
    other = {"chosen": HH[0]["chosen"], "rejected": HH[1]["rejected"]}
    with pytest.raises(ValueError, match=r"records:1: field 'rejected': its conversation .* differs"):
        D.load_hh_rlhf([other])
    with pytest.raises(ValueError, match=r"records:1: field 'rejected': missing"):
        D.load_hh_rlhf([{"chosen": HH[0]["chosen"]}])
    with pytest.warns(UserWarning, match=r"kept 1 records; skipped 2 malformed, 1 empty or identical"):
        recs = D.load_hh_rlhf([other, HH[0], no_assistant, {"chosen": HH[0]["chosen"], "rejected": HH[0]["chosen"]}],
                              strict=False)
    assert recs.stats == {"read": 4, "skipped_malformed": 2, "skipped_empty_or_identical": 1, "kept": 1}


# ----------------------------------------------------------------------------- summary

def test_dataset_summary():
    recs = [prompt(1, checks=[{"type": "lowercase"}, {"type": "max_words", "n": 5}]),
            prompt(2, "rm", harmful=True), prompt(3, "rm", reference="x", checks=[{"type": "lowercase"}], lookalike=True)]
    s = D.dataset_summary(recs)
    assert s["n"] == 3 and s["split"] == {"rm": 2, "sft": 1} and s["category"] == {"open_qa": 3}
    assert s["checks"] == {"lowercase": 2, "max_words": 1} and s["with_checks"] == 2
    assert (s["harmful"], s["lookalike"], s["with_reference"]) == (1, 1, 1)
    assert s["style"] == {"plain": 3} and s["source"] == {"hand": 3}


def test_balanced_sample_covers_every_category_and_the_harmful_prompts():
    from collections import Counter

    from labkit.data import CATEGORIES, balanced_sample

    rm = D.load_prompts("rm")
    sample = balanced_sample(rm, 36, seed=3)
    assert len(sample) == 36 and len({r["id"] for r in sample}) == 36
    groups = Counter("harmful" if r.get("harmful") else "lookalike" if r.get("lookalike") else r["category"]
                     for r in sample)
    assert set(groups) == set(CATEGORIES) | {"harmful", "lookalike"}
    assert max(groups.values()) - min(groups.values()) <= 1  # 12 groups x 3
    assert sample == balanced_sample(rm, 36, seed=3) and sample != balanced_sample(rm, 36, seed=4)
    assert sorted(r["id"] for r in balanced_sample(rm, 10_000)) == sorted(r["id"] for r in rm)  # all, once
    # the first prompts of the file cover far fewer groups
    assert len({r["category"] for r in rm[:12]}) < len(CATEGORIES)
