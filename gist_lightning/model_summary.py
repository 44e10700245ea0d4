"""The model summary ``gist-lightning fit`` prints before training: Lightning's rich one, less the
FLOPs it has not counted."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class ModelSummaryWithoutFlops(RichModelSummary):
    """Lightning counts FLOPs over a forward of the module's ``example_input_array``; a gist module
    has none (a batch carries its gist masks), so its summary read 0 in every row and ``Total FLOPs:
    0``. Those are left out. (The prefill FLOPs gist caching saves are in the compression statistics.)"""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs) -> None:
        if total_flops:  # counted: Lightning's summary as it is
            RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                       total_training_modes, total_flops, **summarize_kwargs)
            return
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name.startswith("Params") else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        totals = {
            "Trainable params": get_human_readable_count(trainable_parameters),
            "Non-trainable params": get_human_readable_count(total_parameters - trainable_parameters),
            "Total params": get_human_readable_count(total_parameters),
            "Total estimated model params size (MB)": get_formatted_model_size(model_size),
            "Modules in train mode": total_training_modes["train"],
            "Modules in eval mode": total_training_modes["eval"],
        }
        console = get_console()
        console.print(table)
        console.print("\n".join(f"[bold]{name}[/]: {value}" for name, value in totals.items()))


def use_model_summary_without_flops(trainer) -> None:
    """Put :class:`ModelSummaryWithoutFlops` in place of Lightning's default rich summary, with its
    depth (a summary of the user's choice, or none, is left as it is)."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichModelSummary:
            trainer.callbacks[i] = ModelSummaryWithoutFlops(callback._max_depth, **callback._summarize_kwargs)
