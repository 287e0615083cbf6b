"""Why do a CPU and a GPU evaluate the same weights into other episodes? (issue 27)

Separates the two candidates: the renderer (Mesa's software EGL here, the NVIDIA driver's EGL on a
GPU machine) and the policy's arithmetic (CPU kernels vs CUDA, where cuDNN convolutions — the ViT's
patch embedding — run in TF32 unless `torch.backends.cudnn.allow_tf32 = False`).

    python bench/device_diag.py MODEL_DIR OUT.npz [--images OTHER.npz]

Renders the first frame of 4 initial states of each of the study's six tasks (config/demo.yaml's
camera and size) and the frame after 15 scripted-expert steps (with the simulator state of each: the
physics is compared too), then runs the teacher's action
prediction on them under every available setting: cpu, cuda (torch defaults), cuda without TF32.
Writes the images, each setting's action tokens and first-token logits to OUT.npz and prints how the
settings differ. `--images OTHER.npz` also runs the policy on another machine's frames, so the
two machines' renders can be compared with the same arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

TASKS = [
    "faucet-open-v3",
    "faucet-close-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "window-open-v3",
    "window-close-v3",
]


def render_frames(seeds=(500840, 500841, 500842, 500843), expert_steps=15):
    from vlaforget.envs.metaworld import MetaWorldEnv, configure_rendering

    gl = configure_rendering()
    imgs, names, states = [], [], []
    for task in TASKS:
        env = MetaWorldEnv(task, seeds[0], camera="corner3", render_size=64, max_steps=200)
        for s in seeds:
            obs = env.reset(seed=s)
            imgs.append(obs["image"])
            states.append(obs["env_state"])
            names.append(f"{task}/{s}/0")
            for _ in range(expert_steps):
                obs, _, _ = env.step(env.expert_action(obs))
            imgs.append(obs["image"])
            states.append(obs["env_state"])
            names.append(f"{task}/{s}/{expert_steps}")
        env.close()
    return np.stack(imgs), names, gl, np.stack(states)


def policy(backend_dir: str, images: np.ndarray, names: list[str], device: str, tf32: bool):
    from vlaforget.models.tiny import TinyBackend

    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    b = TinyBackend.from_dir(backend_dir, device=device)
    from vlaforget.data.instructions import canonical_instruction

    instr = [canonical_instruction(n.split("/")[0]) for n in names]  # the evaluation's instruction
    # the action tokens exactly as the evaluation decodes them (greedy over the 256 action bins)
    from vlaforget.models.prompts import encode_action_prompt

    with torch.no_grad():
        prompts = [encode_action_prompt(b.tokenizer, s).ids + b.action_sep_ids for s in instr]
        pv = b._images(images)
        toks = b._greedy(
            prompts, pv, b.action_dim, slice(b.action_tokenizer.begin, b.vocab_end), False, b.model
        )
        # first action token's logits over the bins (the prefill)
        ids = b._pad([list(p) for p in prompts], b.pad_id).to(b.device)
        lens = torch.tensor([len(p) for p in prompts], device=b.device)
        attn = (torch.arange(ids.shape[1], device=b.device)[None] < lens[:, None]).long()
        out = b.model(input_ids=ids, attention_mask=attn, pixel_values=pv, return_dict=True)
        last = out.logits[torch.arange(len(prompts)), lens - 1 + b.n_image_tokens].float()
        bins = last[:, b.action_tokenizer.begin : b.vocab_end].cpu().numpy()
        patches = b.model.image_embeddings(pv).float().cpu().numpy()
    return np.asarray(toks), bins, patches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--images", help="another machine's OUT.npz: also run the policy on its frames")
    a = ap.parse_args()
    images, names, gl, states = render_frames()
    res = {"images": images, "names": np.array(names), "env_states": states}
    info = {"gl": gl, "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["render_sha"] = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    settings = [("cpu", "cpu", False)]
    if torch.cuda.is_available():
        settings += [("cuda_tf32", "cuda", True), ("cuda_fp32", "cuda", False)]
    sources = [("own", images)]
    if a.images:
        other = np.load(a.images)
        sources.append(("other", other["images"]))
        info["other_render_sha"] = hashlib.sha256(other["images"].tobytes()).hexdigest()[:16]
        diff = np.abs(other["images"].astype(int) - images.astype(int))
        info["env_state_vs_other_max_abs"] = float(np.abs(other["env_states"] - states).max())
        info["env_states_equal_to_other"] = int((other["env_states"] == states).all(1).sum())
        info["render_vs_other"] = {
            "frames_equal": int((diff.reshape(len(images), -1).max(1) == 0).sum()),
            "frames": len(images),
            "pixels_differing": float((diff.max(-1) > 0).mean()),
            "max_abs": int(diff.max()),
        }
    for src, imgs in sources:
        for name, dev, tf32 in settings:
            toks, bins, patches = policy(a.model_dir, imgs, names, dev, tf32)
            res[f"{src}_{name}_tokens"], res[f"{src}_{name}_bins"], res[f"{src}_{name}_patches"] = (
                toks,
                bins,
                patches,
            )
    ref = "own_cpu"
    for k in [k[: -len("_tokens")] for k in res if k.endswith("_tokens")]:
        gap = np.sort(res[f"{k}_bins"], 1)
        info[k] = {
            "tokens_equal_to_own_cpu": float((res[f"{k}_tokens"] == res[f"{ref}_tokens"]).mean()),
            "rows_all_equal_to_own_cpu": int((res[f"{k}_tokens"] == res[f"{ref}_tokens"]).all(1).sum()),
            "max_abs_logit_vs_own_cpu": float(np.abs(res[f"{k}_bins"] - res[f"{ref}_bins"]).max()),
            "max_abs_patch_vs_own_cpu": float(np.abs(res[f"{k}_patches"] - res[f"{ref}_patches"]).max()),
            "min_top2_gap": float((gap[:, -1] - gap[:, -2]).min()),
            "median_top2_gap": float(np.median(gap[:, -1] - gap[:, -2])),
        }
    np.savez_compressed(a.out, **res)
    Path(a.out).with_suffix(".json").write_text(json.dumps(info, indent=1))
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
