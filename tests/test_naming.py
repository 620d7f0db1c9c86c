"""Names of the tree: Data Retriever layout, UID layout, safety of every name, uniqueness among siblings."""

from __future__ import annotations

import datetime as dt
import random
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbiafs.naming import (
    assign_unique,
    instance_filenames,
    patient_dirname,
    safe_component,
    series_dirname,
    study_dirname,
)
from nbiafs.records import Instance, Series, Study


def assert_valid_name(name: str) -> None:
    assert isinstance(name, str) and name
    assert "/" not in name and "\0" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert name == name.strip()
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name)
    assert len(name.encode("utf-8")) <= 255
    assert unicodedata.is_normalized("NFC", name)


def study(uid: str = "1.2.3.30178", **kw) -> Study:
    return Study(study_uid=uid, patient_id="P", collection="C", **kw)


def series(uid: str = "1.2.3.4.03192", **kw) -> Series:
    return Series(series_uid=uid, study_uid="1.2.3", **kw)


# -- descriptive layout ------------------------------------------------------------------------------

def test_study_name_matches_the_data_retriever_layout():
    s = study(date=dt.date(2000, 1, 1), study_id="7", description="NA")
    assert study_dirname(s, "descriptive") == "01-01-2000-7-NA-30178"


def test_series_name_matches_the_data_retriever_layout():
    assert series_dirname(series(number=3, description="CT CHEST"), "descriptive") == "3-CT CHEST-03192"


def test_missing_study_parts_are_dropped():
    assert study_dirname(study(), "descriptive") == "30178"
    assert study_dirname(study(description="Head"), "descriptive") == "Head-30178"
    assert study_dirname(study(date=dt.date(2010, 12, 31)), "descriptive") == "12-31-2010-30178"


def test_missing_series_parts_are_dropped():
    assert series_dirname(series(), "descriptive") == "03192"
    assert series_dirname(series(number=0), "descriptive") == "0-03192"


def test_descriptions_are_cut_to_53_characters():
    name = study_dirname(study(description="x" * 80), "descriptive")
    assert name == "x" * 53 + "-30178"


def test_slashes_and_backslashes_in_descriptions_become_dashes():
    name = series_dirname(series(number=2, description="T1/T2\\PD"), "descriptive")
    assert name == "2-T1-T2-PD-03192"


def test_angle_brackets_are_kept_and_valid():
    name = series_dirname(series(number=5, description="<MPR Range[1]>"), "descriptive")
    assert name == "5-<MPR Range[1]>-03192"
    assert_valid_name(name)


def test_non_ascii_description_is_kept_as_nfc():
    name = study_dirname(study(description="Thorax e\u0301tude \u00fcber 胸部"), "descriptive")
    assert name == "Thorax \u00e9tude \u00fcber 胸部-30178"
    assert_valid_name(name)


def test_control_characters_become_underscores():
    name = series_dirname(series(description="a\0b\nc\x7fd"), "descriptive")
    assert name == "a_b_c_d-03192"


def test_uid_layout_uses_raw_uids():
    assert study_dirname(study(date=dt.date(2000, 1, 1), description="x"), "uid") == "1.2.3.30178"
    assert series_dirname(series(number=1), "uid") == "1.2.3.4.03192"


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError):
        study_dirname(study(), "classic")


# -- safe_component ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("", "_"), ("   ", "_"), (".", "_"), ("..", "_."), (".hidden", "_hidden"),
    ("  LIDC 0001  ", "LIDC 0001"), ("a/b", "a-b"), ("x\ty", "x_y"),
])
def test_safe_component_fixes_hostile_names(text, expected):
    assert safe_component(text) == expected


def test_patient_id_with_spaces_keeps_inner_spaces():
    assert patient_dirname(" TCGA 02 0001 ") == "TCGA 02 0001"


def test_long_names_are_cut_on_a_character_boundary_keeping_the_uid_tail():
    name = study_dirname(study(description="é" * 300, study_id="ü" * 300), "descriptive")
    assert_valid_name(name)
    assert name.endswith("-30178")
    assert safe_component("€" * 300).encode("utf-8") == ("€" * 85).encode("utf-8")


def test_lone_surrogates_are_replaced():
    assert safe_component("a\ud800b") == "a_b"


@settings(max_examples=400, deadline=None)
@given(st.text(), st.text(max_size=12))
def test_safe_component_always_gives_a_valid_idempotent_name(text, tail):
    name = safe_component(text, tail=tail)
    assert_valid_name(name)
    assert safe_component(name) == name


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()), st.text(max_size=70),
       st.one_of(st.none(), st.integers(-10**12, 10**12)))
def test_every_directory_name_is_valid_whatever_the_metadata(description, study_id, uid, number):
    assert_valid_name(study_dirname(study(uid, description=description, study_id=study_id), "descriptive"))
    assert_valid_name(study_dirname(study(uid), "uid"))
    assert_valid_name(series_dirname(series(uid, description=description, number=number), "descriptive"))
    assert_valid_name(series_dirname(series(uid), "uid"))


# -- uniqueness --------------------------------------------------------------------------------------

def test_duplicate_study_date_and_description_get_distinct_stable_names():
    a = study("1.2.840.1.11111", date=dt.date(2000, 1, 1), description="CT")
    b = study("1.2.840.2.11111", date=dt.date(2000, 1, 1), description="CT")
    first = assign_unique([a, b], lambda s: study_dirname(s, "descriptive"), lambda s: s.study_uid)
    second = assign_unique([b, a], lambda s: study_dirname(s, "descriptive"), lambda s: s.study_uid)
    assert first == second
    assert first == {"01-01-2000-CT-11111": a, "01-01-2000-CT-11111-2": b}


def test_duplicate_series_number_and_description_get_distinct_names():
    items = [series(f"1.2.{i}.55555", number=1, description="AX") for i in range(4)]
    names = assign_unique(items, lambda s: series_dirname(s, "descriptive"), lambda s: s.series_uid)
    assert sorted(names) == ["1-AX-55555", "1-AX-55555-2", "1-AX-55555-3", "1-AX-55555-4"]
    assert [names[n].series_uid for n in sorted(names)] == sorted(s.series_uid for s in items)


def test_a_suffix_never_collides_with_a_natural_name():
    items = [("k1", "a"), ("k2", "a"), ("k3", "a-2")]
    names = assign_unique(items, lambda i: i[1], lambda i: i[0])
    assert names == {"a": ("k1", "a"), "a-2": ("k3", "a-2"), "a-3": ("k2", "a")}


def test_repeated_rows_appear_once():
    row = study("1.2.3", description="x")
    assert list(assign_unique([row, row], lambda s: "n", lambda s: s.study_uid)) == ["n"]


def test_suffix_goes_before_the_extension_and_fits_255_bytes():
    long = "x" * 251 + ".dcm"
    names = assign_unique([("a", long), ("b", long)], lambda i: i[1], lambda i: i[0], ext=".dcm")
    for name in names:
        assert_valid_name(name)
        assert name.endswith(".dcm")
    assert len(names) == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=6), st.sampled_from(["a", "a-2", "b", "a-3", "_", "é"])),
                max_size=25),
       st.randoms(use_true_random=False))
def test_assign_unique_is_unique_complete_and_independent_of_order(items, rnd):
    by_key = dict(items)
    key_items = [(k, by_key[k]) for k in by_key]
    names = assign_unique(key_items, lambda i: i[1], lambda i: i[0])
    shuffled = list(key_items)
    rnd.shuffle(shuffled)
    assert assign_unique(shuffled, lambda i: i[1], lambda i: i[0]) == names
    assert len(names) == len(by_key)
    assert sorted(k for k, _ in names.values()) == sorted(by_key)
    for name in names:
        assert_valid_name(name)


# -- instance files ----------------------------------------------------------------------------------

def inst(sop: str, number: int | None) -> Instance:
    return Instance(sop_uid=sop, series_uid="S", number=number, size=10)


def test_instance_files_follow_instance_number_with_missing_numbers_last():
    items = [inst("u5", None), inst("u3", 3), inst("u1", 10), inst("u2", 2), inst("u0", None)]
    names = instance_filenames(items, "descriptive")
    assert [(n, i.sop_uid) for n, i in names.items()] == [
        ("1-001.dcm", "u2"), ("1-002.dcm", "u3"), ("1-003.dcm", "u1"), ("1-004.dcm", "u0"), ("1-005.dcm", "u5")]


def test_equal_instance_numbers_are_ordered_by_sop_uid_whatever_the_answer_order():
    items = [inst("b", 1), inst("a", 1), inst("c", 1)]
    for _ in range(5):
        random.shuffle(items)
        assert [i.sop_uid for i in instance_filenames(items, "descriptive").values()] == ["a", "b", "c"]


def test_more_than_999_instances_are_padded_so_names_sort_in_order():
    items = [inst(f"uid{i}", i) for i in range(1, 1201)]
    names = instance_filenames(items, "descriptive")
    assert list(names)[0] == "1-0001.dcm" and list(names)[-1] == "1-1200.dcm"
    assert sorted(names) == list(names)
    assert [i.number for i in names.values()] == list(range(1, 1201))


def test_repeated_instances_give_one_file():
    assert list(instance_filenames([inst("a", 1), inst("a", 1)], "descriptive")) == ["1-001.dcm"]


def test_uid_layout_names_files_by_sop_uid():
    names = instance_filenames([inst("1.2.3", 2), inst("", 1), inst(".x", 3)], "uid")
    assert "1.2.3.dcm" in names
    for name in names:
        assert_valid_name(name)
        assert name.endswith(".dcm")
