"""Applications on trained SAEs: feature inspection (:mod:`switchsae.apps.inspect`), the static
feature pages it writes (:mod:`switchsae.apps.pages`) and a local server for them
(:mod:`switchsae.apps.serve`)."""
