"""The paper's XGLUE-NC run: XLM-RoBERTa, language = client group.

News classification (10 categories) in en, de, es, fr, ru; each language's
labelled examples are split IID over 10 clients (50 clients), 10 per round.

Needs local files (no download at run time):
  * XGLUE's NC folder as ``<data.data_dir>/xglue_nc/NC/xglue.nc.<lang>.{train,dev}``
    (tab-separated title, body, label), see fedsel_jax/datasets/xglue.py;
  * an XLM-R checkpoint folder (config.json, model.safetensors or
    pytorch_model.bin, tokenizer.json) given as ``model.pretrained``; its
    tokenizer.json is used for the text.
    python -m fedsel_jax.main --config configs/xglue_xlmr.py --workdir runs/xglue \
        --config.model.pretrained=/path/to/xlm-roberta-base \
        --config.data.tokenizer=/path/to/xlm-roberta-base/tokenizer.json
"""

from configs import default


def get_config(arg: str = ""):
  c = default.paper_run(default.get_config())
  c.data.name = "xglue"
  c.data.tokenizer = "~/models/xlm-roberta-base/tokenizer.json"
  c.data.max_len = 128
  c.data.partition = "natural"   # natural groups = languages
  c.data.num_clients = 50
  c.model.name = "xlmr"
  c.model.pretrained = "~/models/xlm-roberta-base"
  c.model.max_len = 128
  c.fl.clients_per_round = 10
  c.fl.batch_size = 32
  c.fl.client_chunk = 5
  if arg == "smoke":
    default.smoke_run(c)
  elif arg:
    raise ValueError(f"configs/xglue_xlmr.py takes '' or 'smoke', got {arg!r}")
  return c
