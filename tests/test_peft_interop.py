"""A lora_llava adapter is a plain PEFT adapter: code that imports nothing from lora_llava loads it onto the
base (projector included, as modules_to_save) and answers exactly as `lora-llava eval` does."""

from __future__ import annotations

import json
import subprocess
import sys

PLAIN = r"""
import json, sys
import torch
from PIL import Image
from peft import PeftModel
from transformers import AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration

base, adapter, data, folder, quantized = sys.argv[1:6]
torch.set_num_threads(1)
kwargs = {"dtype": torch.float32}
if quantized == "4bit":  # the base exactly as the adapter was trained on (its recipe's quantization)
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
model = LlavaForConditionalGeneration.from_pretrained(base, **kwargs)
model = PeftModel.from_pretrained(model, adapter).eval()
processor = AutoProcessor.from_pretrained(adapter)
answers = []
for rec in json.load(open(data)):
    question = rec["conversations"][0]["value"].replace("<image>", "").strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.open(f"{folder}/{rec['image']}").convert("RGB"), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps(answers))
"""


def test_plain_peft_reproduces_the_adapters_answers(trained_run, shapes, tiny_path, tmp_path, capsys):
    from lora_llava.cli.main import main

    data = tmp_path / "eval.json"
    data.write_text(json.dumps(json.loads((shapes / "eval.json").read_text())[:8]))
    code = main(["eval", str(trained_run), "--data", str(data), "--image-folder", str(shapes / "images"),
                 "--json", "--batch-size", "1", "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0
    ours = [r["prediction"] for r in json.loads(capsys.readouterr().out)["predictions"]]
    args = [
        sys.executable,
        "-c",
        PLAIN,
        str(tiny_path),
        str(trained_run / "adapter"),
        str(data),
        str(shapes / "images"),
    ]
    run = subprocess.run([*args, "4bit"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[-1]) == ours
    assert "lora_llava" not in PLAIN
