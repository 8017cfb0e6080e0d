"""The grid a QAT run trained on against the grid post-training quantization deploys, for one checkpoint.

    python tests/scripts/qat_grid.py CHECKPOINT PTQ_FOLDER SCHEME

Loads the checkpoint into a single-process Megatron model with QAT applied (model/qat.py), and prints one JSON
line: for each quantized Llama weight, whether the QAT fake-quantized Megatron weight (mapped through
model/hf_map.py) equals the PTQ folder's dequantized weight bit for bit; and the largest |logit difference|
between the QAT forward and the PTQ model, and between the plain Megatron forward and the PTQ model.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import AutoModelForCausalLM  # noqa: E402

from model.export_hf import load_megatron, megatron_logits  # noqa: E402
from model.hf_map import llama_tensor, llama_weights  # noqa: E402
from model.qat import QAT_LAYERS, apply_qat, quantizer  # noqa: E402
from model.quantize import SCHEMES  # noqa: E402

checkpoint, folder, scheme = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
gpt, m, _ = load_megatron(checkpoint)
ptq = AutoModelForCausalLM.from_pretrained(folder).eval()
tokens = torch.randint(0, m.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    deployed = ptq(tokens).logits.float()
    plain = megatron_logits(gpt, m, tokens)

params, equal = dict(gpt.named_parameters()), {}
for w in llama_weights(m):
    layer = next((name for name in QAT_LAYERS if f".{name}." in w.megatron), None)
    if layer is None:
        continue
    fake = quantizer(SCHEMES[scheme], whole_rows=QAT_LAYERS[layer] == "column")(params[w.megatron].detach())
    dequantized = ptq.get_submodule(w.hf.removesuffix(".weight")).weight.dequantize()
    equal[w.hf] = torch.equal(llama_tensor(w, fake, m), dequantized)

layers = apply_qat(gpt, scheme)
with torch.no_grad():
    trained = megatron_logits(gpt, m, tokens)
print(json.dumps({"layers": layers, "equal": equal, "qat_vs_ptq": (trained - deployed).abs().max().item(),
                  "plain_vs_ptq": (plain - deployed).abs().max().item()}))
