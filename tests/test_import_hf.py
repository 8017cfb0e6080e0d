"""Starting from published weights: Hugging Face Llama folders (built offline by tests/hf_models.py) imported into
Megatron-Core, checked against transformers at three layouts, exported back bit for bit, continued-pretrained
through the pretrain flow and instruction-tuned through the sft flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from model.config import ParallelConfig
from model.data import token_rows
from model.import_hf import model_config_from_hf

from tasks.lineage import lineage

from conftest import ROOT, bundled_docs, metrics, sft_spec, write_jsonl

SHAPES = ("llama2", "llama3")


def run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory) -> dict[str, Path]:
    """Each folder imported with the command a user runs, in fp32."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for shape, folder in hf_models.items():
        report = run("-m", "model.import_hf", str(folder), str(root / shape), "--tp", "2", "--dtype", "fp32")
        assert report["dtype"] == "fp32" and report["tokenizer"]
        out[shape] = root / shape
    return out


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_imported_logits_equal_transformers_at_tp1_tp2_and_pp2(hf_models, imported, tmp_path):
    from model.distributed import free_port

    tokens = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), "tests/scripts/layout_logits.py",
                           str(tmp_path / "tokens.pt"), str(tmp_path), *map(str, imported.values())],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shape in SHAPES:
        reference = hf_logits(hf_models[shape], tokens)
        for layout in ("tp1-pp1", "tp2-pp1", "tp1-pp2"):
            logits = torch.load(tmp_path / f"{shape}-{layout}.pt")
            diff = (logits - reference).abs().max().item()
            print(f"{shape} {layout}: max |logit difference| {diff:.2e}")
            assert logits.shape == reference.shape and diff < 1e-4


def test_import_then_export_gives_the_original_tensors_and_config(hf_models, imported, tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in f.keys()})
        return out

    for shape in SHAPES:
        report = run("-m", "model.export_hf", str(imported[shape]), str(tmp_path / shape))
        assert report["max_logit_diff"] < 1e-4
        original, exported = tensors(hf_models[shape]), tensors(tmp_path / shape)
        assert sorted(exported) == sorted(original)
        assert all(torch.equal(exported[name], original[name]) for name in original), shape
        fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id", "hidden_act")
        a, b = AutoConfig.from_pretrained(hf_models[shape]), AutoConfig.from_pretrained(tmp_path / shape)
        assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}
    assert AutoConfig.from_pretrained(tmp_path / "llama2").tie_word_embeddings  # and lm_head.weight stays absent


@pytest.mark.parametrize("edit,message", [
    ({"model_type": "mistral"}, r"model_type 'mistral' is not supported; only 'llama'"),
    ({"attention_bias": True}, r"attention_bias True cannot be represented"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' cannot be represented"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling.rope_type 'llama3'"),
    ({"head_dim": 32}, r"head_dim 32 differs"),
])
def test_an_architecture_it_cannot_represent_is_refused_naming_the_key(hf_models, edit, message):
    config = {**json.loads((hf_models["llama3"] / "config.json").read_text()), **edit}
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(config)


def test_a_layout_the_model_cannot_take_is_refused_before_writing(hf_models, tmp_path):
    m = model_config_from_hf(json.loads((hf_models["llama3"] / "config.json").read_text()))
    with pytest.raises(ValueError, match="num_query_groups 2 is not divisible by tensor_parallel 4"):
        ParallelConfig(4, 1).check_split(m)
    proc = subprocess.run([sys.executable, "-m", "model.import_hf", str(hf_models["llama3"]), str(tmp_path / "x"),
                           "--pp", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "num_layers 2 is not divisible by pipeline_parallel x virtual_pipeline = 3 x 1" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_shards_tokenized_with_a_pretrained_tokenizer_json(hf_models, tmp_path):
    """The shard stage with Llama-3's kind of tokenizer (tokenizer.json, through `tokenizers`): every document is
    <|begin_of_text|> + its ids + <|end_of_text|>, and the manifest records that tokenizer."""
    import gzip

    from model.tokenizer import Tokenizer
    from tasks.lib.manifest import DataLineage, ShardManifest
    from tasks.shard import shard_documents
    from tasks.spec import ShardingConfig

    docs = [d for d in bundled_docs("kjv", 20)]
    (tmp_path / "docs" / "kjv").mkdir(parents=True)
    with gzip.open(tmp_path / "docs" / "kjv" / "00000.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    (tmp_path / "shard").mkdir()
    shard_documents(tmp_path / "docs", hf_models["llama3"], ShardingConfig(seq_len=64, validation_fraction=0.0),
                    DataLineage(), tmp_path / "shard")
    manifest = ShardManifest.load(tmp_path / "shard")
    tokenizer = Tokenizer(hf_models["llama3"])
    assert tokenizer.kind == "tokenizers" and manifest.tokenizer_sha256 == tokenizer.sha256
    assert manifest.eos_id == tokenizer.token_id("<|end_of_text|>") and manifest.vocab_size == 1000
    expected = [t for d in docs for t in tokenizer.encode_document(tokenizer.encode([d["text"]])[0])]
    assert expected[0] == tokenizer.token_id("<|begin_of_text|>")
    rows = token_rows(pq.read_table(tmp_path / "shard" / manifest.shards[0].path))
    assert rows.flatten().tolist() == expected[:rows.size]


# ---------------------------------------------------------------- through the flows

HF_TRAIN = {"steps": 6, "global_batch": 8, "micro_batch": 4, "warmup_steps": 1, "lr": 0.003, "eval_every": 3,
            "eval_batches": 2, "log_every": 1, "save_every": 3}


@pytest.mark.usefixtures("prefect_server")
def test_continued_pretraining_from_an_import_starts_at_transformers_loss_and_learns(hf_models, pretrained_by_flow,
                                                                                      tmp_path):
    """The pretrain flow with init_from_hf, on the flow tests' corpus and store (its cleaned documents are
    reused; the tokenizer stage copies the model's, the shards are tokenized with it)."""
    from transformers import AutoModelForCausalLM

    from flows.pretrain import pretrain_flow
    from model.checkpoint import read_train_state, resolve_checkpoint
    from model.data import TrainSamples
    from tasks.lib.manifest import ShardManifest
    from model.tokenizer import Tokenizer

    folder = hf_models["llama2"]
    spec = yaml.safe_load(pretrained_by_flow.spec_path.read_text())
    spec["tokenizer"] = {"pretrained": str(hf_models["llama3"])}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(spec))
    wrong = pretrain_flow(str(tmp_path / "other.yaml"), {"train": HF_TRAIN}, init_from_hf=str(folder),
                          runs_dir=str(tmp_path / "runs"), return_state=True)
    with pytest.raises(ValueError, match=r"tokenizer.pretrained \(.*llama3\) is not the model's"):
        wrong.result()

    # The spec says nothing of tokenizers: the data flow tokenizes with the model's own.
    run_dir = Path(pretrain_flow(str(pretrained_by_flow.spec_path), {"train": HF_TRAIN}, init_from_hf=str(folder),
                                 runs_dir=str(tmp_path / "runs")))
    state = read_train_state(resolve_checkpoint(run_dir))
    assert state["preset"] == "hf" and state["model"]["tie_embeddings"] and state["hf_config"]["vocab_size"] == 1000
    manifest = ShardManifest.load(state["manifest"])
    tokenizer = Tokenizer(folder)
    assert manifest.tokenizer_sha256 == tokenizer.sha256 and manifest.vocab_size == 1000

    # Documents start with BOS (the model's tokenizer adds it) and end with EOS: in the packed rows, every EOS
    # that is not a row's last token is followed by the next document's BOS.
    rows = torch.from_numpy(token_rows(pq.read_table(Path(state["manifest"]) / manifest.shards[0].path)))
    ends = (rows[:, :-1] == tokenizer.eos_id).nonzero()
    assert len(ends) > 10 and (rows[ends[:, 0], ends[:, 1] + 1] == tokenizer.bos_id).all()
    first = TrainSamples(state["manifest"], seed=1234).batch(0, HF_TRAIN["global_batch"])["tokens"]

    losses = [r["loss"] for r in metrics(run_dir)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(first[:, :-1]).logits
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), first[:, 1:].flatten()).item()
    print(f"step 1 loss {losses[0]:.6f}, transformers on the same batch {reference:.6f}; last {losses[-1]:.4f}")
    assert losses[0] == pytest.approx(reference, rel=1e-5)
    assert losses[-1] < losses[0] - 0.1

    # Its lineage: the manifest it trained on, and the import it started from, down to the Hugging Face folder.
    info = lineage(run_dir)
    assert state["start"]["kind"] == info["start"] == "hf_import"
    assert info["initialised_from"]["imported_from"] == str(folder)
    assert info["initialised_from"]["tokenizer"]["sha256"] == tokenizer.sha256
    printed = subprocess.run([sys.executable, "-m", "tasks.lineage", str(run_dir)], cwd=ROOT, capture_output=True,
                             text=True)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert f"from the Hugging Face folder {folder}" in printed.stdout and "initialised from (hf import):" in printed.stdout


@pytest.mark.usefixtures("prefect_server")
def test_sft_from_a_hugging_face_folder_uses_its_chat_template(hf_models, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from flows.sft import sft_flow
    from model.checkpoint import read_train_state, resolve_checkpoint
    from model.data import validation_rows
    from model.export_hf import export
    from model.tokenizer import Tokenizer

    folder = hf_models["llama3"]
    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
             for a in range(12) for b in range(12)]
    spec_path = tmp_path / "sft.yaml"
    spec_path.write_text(yaml.safe_dump(sft_spec(write_jsonl(tmp_path / "chats.jsonl", chats),
                                                 validation_fraction=0.1).model_dump(mode="json", exclude_defaults=True)))
    run_dir = Path(sft_flow(str(spec_path), pretrained=str(folder), run={"train": HF_TRAIN}, seq_len=64,
                            runs_dir=str(tmp_path / "runs"), artifacts_dir=str(tmp_path / "artifacts")))
    records = metrics(run_dir)
    assert records[-1]["loss"] < records[0]["loss"]

    # The rows were rendered with Llama-3's template, and only the replies (with <|eot_id|>) are learned.
    checkpoint = resolve_checkpoint(run_dir)
    tokenizer = Tokenizer(folder)
    rows = validation_rows(read_train_state(checkpoint)["manifest"], 4)
    text = tokenizer.backend.decode(rows["tokens"][0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is")
    learned = rows["tokens"][0][rows["loss_mask"][0] == 1].tolist()
    assert tokenizer.backend.decode(learned, skip_special_tokens=False).endswith("<|eot_id|>")

    out = tmp_path / "export"
    export(checkpoint, out)
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert prompt == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
                     "<|start_header_id|>assistant<|end_header_id|>\n\n"
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert tokenizer.token_id("<|eot_id|>") in stops and tokenizer.eos_id in stops


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("name", ["pretrain/continue-hf-7b", "sft/hf-7b"])
def test_7b_variants_fail_fast_without_gpus(name, tmp_path):
    """prefect.yaml's 7B deployments, run with their own parameters on this GPU-less machine: failed in seconds,
    saying what they need, before any import or data work."""
    import time

    from flows.pretrain import pretrain_flow
    from flows.sft import sft_flow

    flows = {"pretrain": pretrain_flow, "sft": sft_flow}
    (deployment,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                     if f"{d['entrypoint'].split(':')[1].removesuffix('_flow')}/{d['name']}" == name]
    started = time.perf_counter()
    state = flows[name.split("/")[0]](**{**deployment["parameters"], "runs_dir": str(tmp_path / "runs")},
                                      return_state=True)
    with pytest.raises(RuntimeError, match=r"8 GPUs \(TP 2 x PP 1 x DP 4\), but this machine has 0 CUDA"):
        state.result()
    assert time.perf_counter() - started < 30 and not (tmp_path / "runs").exists()
