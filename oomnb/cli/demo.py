"""`oomnb demo`: a real training loop that runs out of memory and recovers.

It drives a real IPython shell exactly as a notebook would, so what it prints
is what a notebook shows under each cell.
"""

from __future__ import annotations

import textwrap

CELLS = [
    (
        "Load the extension (no GPU here: oomnb simulates one on the CPU)",
        "%load_ext oomnb",
    ),
    (
        "A model, an optimizer and a loader",
        """
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()

        def loader(batch_size, steps=3):
            for _ in range(steps):
                yield torch.randn(batch_size, 512), torch.randint(0, 10, (batch_size,))
        batch_size = 256
        """,
    ),
    (
        "Train on a 256 MiB card: it fits",
        """
        %%gpumem --limit 256MiB --batch-var batch_size
        for x, y in loader(batch_size):
            loss = loss_fn(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
        """,
    ),
    (
        "A batch 64 times larger runs out of memory: caught, memory given back",
        """
        batch_size = 16384
        """,
    ),
    (
        None,
        """
        %%gpumem --limit 256MiB --batch-var batch_size
        for x, y in loader(batch_size):
            loss = loss_fn(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
        """,
    ),
    (
        "The kernel is fine: take the suggested batch size and run again",
        """
        import oomnb
        advice = [s for s in oomnb.last_report().suggestions if s.kind == "batch_size"]
        batch_size = advice[0].params["value"] if advice else batch_size // 4
        print("batch_size =", batch_size)
        """,
    ),
    (
        None,
        """
        %%gpumem --limit 256MiB --batch-var batch_size
        for x, y in loader(batch_size):
            loss = loss_fn(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
        """,
    ),
    ("Device status", "%gpumem"),
]


def run() -> int:
    """Run the demo cells in a fresh IPython shell, printing what each shows."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(colors="nocolor")
    failures = 0
    for number, (title, code) in enumerate(CELLS, 1):
        source = textwrap.dedent(code).strip("\n")
        if title:
            print(f"\n# {title}")
        print(
            "\n".join(
                f"In [{number}]: {line}" if i == 0 else f"   ...: {line}" for i, line in enumerate(source.splitlines())
            )
        )
        result = shell.run_cell(source, store_history=True)
        if not result.success:
            failures += 1
    print("\nDemo finished:", "every cell ran." if not failures else f"{failures} cell(s) failed.")
    return 1 if failures else 0
