"""Run under torchrun: one training step of escnet-tiny through the shared loop, then each rank saves its weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sspsam.engine.train_ovss import train_ovss


def main(data_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = train_ovss("escnet-tiny", data_root, Path(out_dir) / "run", steps=1, batch_size=2, seed=0, save_every=1,
                     log_every=0, tensorboard=False)
    sd = {k: v.detach().cpu() for k, v in res["model"].state_dict().items()}
    torch.save({"state_dict": sd, "world": dist.get_world_size(), "step": res["steps"]}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
