# RFC 5228 2.4.2.4: ${hex:} and ${unicode:} in strings
require ["encoded-character", "fileinto"];
if header :contains "subject" "${hex:47 72 C3 BC}" { fileinto "HexGruss"; }
if header :contains "subject" "${unicode:2615}" { fileinto "UnicodeCoffee"; }
if header :contains "subject" "Caf${unicode:e9}" { fileinto "UnicodeCafe"; }
fileinto "${hex:41 42}${unicode:0043}";
fileinto "${hex:}x${unicode: 44 }";
fileinto "${HEX:45}-${hex:zz}";
