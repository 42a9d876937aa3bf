"""A pure-PyTorch TULIP / SigLIP two-tower model for inference on converted checkpoints.

No megatron, Transformer Engine or DALI import: a converted checkpoint runs wherever PyTorch
does. Parameter names follow Hugging Face `SiglipModel` (`vision_model.*`, `text_model.*`,
`logit_scale`, `logit_bias`), so the Hugging Face export only adds configs. The math is the
same as `tulip_mega.models.tulip.TulipModel`: pre-norm encoder layers (LayerNorm, separate
q/k/v, tanh-GELU MLP), no attention mask (both towers attend bidirectionally), MAP-head
pooling for images, last-token pooling + linear head for text, L2-normalised embeddings.

    model = TulipPlainModel.from_pretrained("out/")
    sims = model.similarity(model.encode_image(images), model.encode_text(tokens))
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class PlainConfig:
    """Architecture of the plain model (what `config.json` stores under "tulip_plain")."""

    # image_size, patch_size / vocab_size, context_length, plus num_layers, hidden_size,
    # num_heads, ffn_hidden_size per tower (the recipe's model.vision / model.text fields).
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    layernorm_eps: float = 1e-6

    def to_json(self) -> dict:
        return {"format": "tulip_plain", "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "PlainConfig":
        if d.get("model_type") == "siglip" and "tulip_plain" in d:  # a Hugging Face export
            d = d["tulip_plain"]
        if d.get("format") != "tulip_plain":
            raise ValueError(f"not a tulip plain-model config (format={d.get('format')!r})")
        return cls(vision=dict(d["vision"]), text=dict(d["text"]), layernorm_eps=float(d["layernorm_eps"]))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h]
        b, s, h = x.shape
        hn = h // self.heads

        def split(t):
            return t.view(b, s, self.heads, hn).transpose(1, 2)  # [b, nh, s, hn]

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hn)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, t: dict, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(t["hidden_size"], eps=eps)
        self.self_attn = Attention(t["hidden_size"], t["num_heads"])
        self.layer_norm2 = nn.LayerNorm(t["hidden_size"], eps=eps)
        self.mlp = MLP(t["hidden_size"], t["ffn_hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, t: dict, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(t, eps) for _ in range(t["num_layers"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionEmbeddings(nn.Module):
    def __init__(self, v: dict) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, v["hidden_size"], kernel_size=v["patch_size"], stride=v["patch_size"])
        num_patches = (v["image_size"] // v["patch_size"]) ** 2
        self.position_embedding = nn.Embedding(num_patches, v["hidden_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight.unsqueeze(0)


class MAPHead(nn.Module):
    """Multi-head attention pooling with one learned probe (Hugging Face SiglipMultiheadAttentionPoolingHead)."""

    def __init__(self, v: dict, eps: float) -> None:
        super().__init__()
        h = v["hidden_size"]
        self.probe = nn.Parameter(torch.zeros(1, 1, h))
        self.attention = nn.MultiheadAttention(h, v["num_heads"], batch_first=True)
        self.layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = MLP(h, v["ffn_hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)
        x = self.attention(probe, x, x, need_weights=False)[0]
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class VisionTower(nn.Module):
    def __init__(self, v: dict, eps: float) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(v)
        self.encoder = Encoder(v, eps)
        self.post_layernorm = nn.LayerNorm(v["hidden_size"], eps=eps)
        self.head = MAPHead(v, eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.post_layernorm(self.encoder(self.embeddings(images))))


class TextEmbeddings(nn.Module):
    def __init__(self, t: dict) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(t["vocab_size"], t["hidden_size"])
        self.position_embedding = nn.Embedding(t["context_length"], t["hidden_size"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(pos).unsqueeze(0)


class TextTower(nn.Module):
    def __init__(self, t: dict, projection: int, eps: float) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(t)
        self.encoder = Encoder(t, eps)
        self.final_layer_norm = nn.LayerNorm(t["hidden_size"], eps=eps)
        self.head = nn.Linear(t["hidden_size"], projection)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.final_layer_norm(self.encoder(self.embeddings(tokens)))
        return self.head(x[:, -1])  # last token (SigLIP: eos/pad at the end, no mask)


class TulipPlainModel(nn.Module):
    """Both towers plus the sigmoid-loss logit scale (log space) and bias."""

    def __init__(self, config: PlainConfig) -> None:
        super().__init__()
        self.config = config
        eps = config.layernorm_eps
        self.vision_model = VisionTower(config.vision, eps)
        self.text_model = TextTower(config.text, config.vision["hidden_size"], eps)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] -> L2-normalised [b, vision hidden] (fp32)."""
        return F.normalize(self.vision_model(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, context_length] token ids -> L2-normalised [b, vision hidden] (fp32)."""
        return F.normalize(self.text_model(tokens).float(), dim=-1)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Sigmoid-loss logits [n_img, n_txt] = exp(logit_scale) * img @ txt.T + logit_bias."""
        return self.logit_scale.float().exp() * image_emb @ text_emb.T + self.logit_bias.float()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        img, txt = self.encode_image(images), self.encode_text(tokens)
        return {"image_emb": img, "text_emb": txt, "logits": self.similarity(img, txt)}

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], map_location: str = "cpu") -> "TulipPlainModel":
        from safetensors.torch import load_file

        path = Path(path)
        config = PlainConfig.from_json(json.loads((path / CONFIG_NAME).read_text()))
        model = cls(config)
        state = load_file(str(path / WEIGHTS_NAME), device=map_location)
        dtype = next(iter(state.values())).dtype if state else torch.float32
        model.to(dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_NAME} does not match the config: missing {missing}, "
                             f"unexpected {unexpected}")
        return model.eval()
