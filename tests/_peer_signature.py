"""One check shared by the compat tests: an adapter takes the peer class's keywords, defaults and forward
arguments (``inspect`` is how a user, or an IDE, sees them)."""
import inspect


def assert_peer_signature(ours: type, theirs: type, *, also: tuple[type, ...] = (), skip_default: tuple[str, ...] = ()):
    """Every keyword of ``theirs.__init__`` (and of the classes in ``also``, whose keywords the peer forwards through
    ``**kwargs``) is accepted by ``ours`` with the same default (except ``skip_default``), and both forwards take the
    same arguments in the same order."""
    mine = inspect.signature(ours).parameters
    for peer_cls in (theirs, *also):
        for key, param in inspect.signature(peer_cls).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            assert key in mine, f"{ours.__name__}: peer keyword {key!r} missing"
            if key not in skip_default:
                assert repr(mine[key].default) == repr(param.default), f"{ours.__name__}.{key}: default differs"
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
