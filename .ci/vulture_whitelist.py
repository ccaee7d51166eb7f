"""Names vulture cannot see being used (read by .ci/deadcode): what frameworks call."""

from weavepy.cni import plugin

plugin._DecodeContext.parse_constant  # read by the C JSON scanner (_json.make_scanner)
plugin.BinaryIO  # used in a string annotation under TYPE_CHECKING
