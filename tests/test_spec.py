import pytest

from tasks.spec import PROJECT_ROOT, DataSpec, EvalSpec, SFTSpec, SpecError, load_spec

SPEC_FILES = sorted((PROJECT_ROOT / "data_specs").glob("*.yaml"))
KINDS = {"sft": SFTSpec, "eval": EvalSpec}  # by file-name prefix; anything else is a data spec


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.name for p in SPEC_FILES])
def test_every_shipped_spec_loads(path):
    kind = KINDS.get(path.name.split("_")[0], DataSpec)
    spec = load_spec(path, kind)
    # Its full dump (every default written out, as the benchmarks and the lineage record it) reads back the same.
    assert kind.model_validate_json(spec.model_dump_json()) == spec
    sources = spec.multiple_choice if isinstance(spec, EvalSpec) else spec.sources
    assert sources
    for source in sources:
        if isinstance(spec, DataSpec):
            spec.cleaning_for(source)
            for other in spec.decontamination.against:
                assert (PROJECT_ROOT / other).is_file(), other
        for pattern in source.paths:  # the bundled defaults must point at files that exist
            assert list(PROJECT_ROOT.glob(pattern)), pattern


def test_default_spec_tunes_verse_sources_but_not_prose():
    spec = load_spec("data_specs/default.yaml")
    by_name = {s.name: spec.cleaning_for(s) for s in spec.sources}
    assert by_name["sotu"].c4.filter_no_terminal_punct is True
    assert by_name["shakespeare"].c4.filter_no_terminal_punct is False
    assert by_name["milton"] == by_name["shakespeare"]  # YAML anchor shared by both verse sources


def test_all_problems_reported_with_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
name: bad
sources:
  - name: a
    kind: local
    license: x
  - name: b
    kind: url
    url: ftp://example/x
    license: x
tokenizer: {vocab_size: 10, typo_field: 1}
sharding: {validation_fraction: 1.5}
""")
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    msg = str(err.value)
    assert str(bad) in msg
    for fragment in ("sources.0", "needs `paths`", "sources.1", "http", "tokenizer.vocab_size",
                     "tokenizer.typo_field", "sharding.validation_fraction"):
        assert fragment in msg, fragment


def test_bad_per_source_cleaning_override_is_named():
    with pytest.raises(ValueError, match=r"sources\[a\]\.cleaning: c4\.min_words_per_lin"):
        DataSpec.model_validate({"name": "x", "sources": [
            {"name": "a", "kind": "local", "paths": ["x"], "license": "x",
             "cleaning": {"c4": {"min_words_per_lin": 3}}}]})


def test_mixture_must_name_known_sources():
    with pytest.raises(ValueError, match="unknown sources"):
        DataSpec.model_validate({"name": "x", "sharding": {"mixture": {"nope": 1.0}}, "sources": [
            {"name": "a", "kind": "local", "paths": ["x"], "license": "x"}]})


def test_mixture_of_all_zero_weights_is_refused():
    sources = [{"name": n, "kind": "local", "paths": ["x"], "license": "x"} for n in ("a", "b")]
    with pytest.raises(ValueError, match="sharding.mixture gives every source weight 0"):
        DataSpec.model_validate({"name": "x", "sharding": {"mixture": {"a": 0, "b": 0.0}}, "sources": sources})
    # An unlisted source still gets its token share, and one weight above 0 is enough.
    DataSpec.model_validate({"name": "x", "sharding": {"mixture": {"a": 0}}, "sources": sources})
    DataSpec.model_validate({"name": "x", "sharding": {"mixture": {"a": 0, "b": 1}}, "sources": sources})


def test_fields_of_another_kind_of_source_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
name: bad
sources:
  - {name: a, kind: local, paths: [x], split: validation, license: x}
  - {name: b, kind: hf, dataset: json, url: "https://example.org/x.jsonl", license: x}
  - {name: c, kind: url, url: "https://example.org/x.jsonl", paths: [x], license: x}
""")
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    msg = str(err.value)
    for fragment in ("sources.0", "`split` applies to 'hf' sources, not to this 'local' one", "sources.1",
                     "`url` applies to 'url' sources", "sources.2", "`paths` applies to 'local' sources"):
        assert fragment in msg, fragment


def test_missing_spec_file_lists_available_specs(tmp_path):
    with pytest.raises(SpecError, match="default.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_spec(p)
