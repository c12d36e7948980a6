"""The jobs the benchmarks run: a no-op, sync and async."""

from runlane import Runlane

app = Runlane()  # RUNLANE_URL


@app.job
def noop() -> None:
    return None


@app.job
async def anoop() -> None:
    return None
