"""Field names of the entries of a batch's two streams (``keys.lines``, ``keys.results``), in one place.

Entries are written by Lua scripts, which spell these names themselves (a stream entry is
written in one script and read in Python elsewhere): keep both in step.

``keys.lines(batch)``: one entry per request line published, id ``0-<line index + 1>``, written by
the feeder's ``_FEED`` script (service/web/feeder.py), read by the workers (workers/worker.py):

    c  the line's custom_id
    b  the request body, byte for byte as in the input file
    p  the provider that serves it (its name; a made-up one when none does: the worker fails it)
    t  its estimated cost in tokens (what the provider's TPM bucket is charged)
    q  for a traced, sampled line only: when it was published (ns), the start of its queue wait

``keys.results(batch)``: one entry per line recorded, written by the recording script
(store._RECORD), drained by the finalizer (workers/finalizer.py) into the output and error files:

    r  the result line (its JSON, as it goes into the file)
    o  the outcome (``store.Outcome``): ``completed`` to the output file, anything else to the error file
"""

LINE_CUSTOM_ID = b"c"
LINE_BODY = b"b"
LINE_PROVIDER = b"p"
LINE_COST = b"t"
LINE_QUEUED_NS = b"q"

RESULT_LINE = b"r"
RESULT_OUTCOME = b"o"
