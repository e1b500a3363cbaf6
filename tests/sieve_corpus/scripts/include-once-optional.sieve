# RFC 6609 3.2: :once includes a script a single time; :optional skips a missing one
require ["include", "variables"];
global "count";
set "count" "";
include :once :personal "once";
include :once :personal "once";
include :optional "no-such-script";
include :personal "once";
