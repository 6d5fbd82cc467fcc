"""A step's output crosses from the engine process to the HTTP process pickled: every field comes back."""

import dataclasses
import pickle

from server.request import RequestOutput, RequestStatus, TokenLogprob


def test_an_output_with_every_field_set_comes_back_equal_from_pickle():
    output = RequestOutput("cmpl-1", " the", [5, 6], [TokenLogprob(5, -0.5, ((5, -0.5), (7, -1.0)), 1)],
                           [None, TokenLogprob(3, -2.0, ())], RequestStatus.FINISHED_STOPPED, 12, 2, "an error", 8,
                           "stop here")
    assert all(getattr(output, f.name) != f.default for f in dataclasses.fields(RequestOutput)
               if f.default is not dataclasses.MISSING)  # no field left at its default: each is checked
    assert pickle.loads(pickle.dumps(output)) == output
