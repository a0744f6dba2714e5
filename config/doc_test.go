package config

import (
	"bufio"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclsyntax"
)

// The operator reference, docs/configuration.md, is checked against the
// hcl-tagged structs of decode.go, found by reflection so that a new key
// fails this test until it is documented. The conventions it enforces:
//
//   - Top-level attributes are documented under the heading
//     "## Top-level keys"; each block under a heading "## `NAME`", where NAME
//     is the block type followed, for a labelled block, by its label in
//     capitals and quotes: "## `listener "NAME"`". The headings are in the
//     order of the struct fields, which is also the order of config.hcl.
//   - Every attribute is one table row in its block's section whose first
//     cell is its full name in backticks: "| `cache.expiration` | ...",
//     "| `listener "NAME".address` | ...". The columns are
//     Key | Type | Default | Allowed | Meaning.
//   - Type is "bool", "integer", "string", "list of strings" or "duration"; a duration is a
//     string that must parse as one, which the test proves by setting it to
//     an invalid value.
//   - A Default cell that starts with a backticked HCL literal is proved:
//     setting the key to it must give the same Config as leaving it out.
//     A Default cell without one (e.g. "none; required") is not checked.
//   - No row, heading or backticked reference (`cache.expiration`,
//     `listener "imap".address`, `backend.b1.weight`) may name a key or
//     block that does not exist.

const (
	docPath    = "../docs/configuration.md"
	exampleHCL = "../config.hcl"
	topHeading = "Top-level keys"
)

// docStep is one block on the way to an attribute.
type docStep struct {
	typ   string
	label string // the label's name in capitals ("NAME"); "" for an unlabelled block
}

func (s docStep) String() string {
	if s.label == "" {
		return s.typ
	}
	return fmt.Sprintf("%s %q", s.typ, s.label)
}

type docBlock struct {
	path []docStep
	name string // as the heading writes it: listener "NAME"
}

type docAttr struct {
	path []docStep // enclosing blocks, empty at top level
	attr string
	name string       // full name: cache.expiration, listener "NAME".address
	kind reflect.Kind // of the Go field, pointers removed
}

func joinSteps(path []docStep) string {
	parts := make([]string, len(path))
	for i, s := range path {
		parts[i] = s.String()
	}
	return strings.Join(parts, ".")
}

// schema walks the hcl-tagged raw structs of the file.
func schema(t *testing.T) ([]docBlock, []docAttr) {
	t.Helper()
	var blocks []docBlock
	var attrs []docAttr
	var walk func(typ reflect.Type, path []docStep)
	walk = func(typ reflect.Type, path []docStep) {
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			tag, ok := f.Tag.Lookup("hcl")
			if !ok {
				continue
			}
			name, kind, _ := strings.Cut(tag, ",")
			ft := f.Type
			for ft.Kind() == reflect.Pointer || ft.Kind() == reflect.Slice {
				ft = ft.Elem()
			}
			switch kind {
			case "label":
				// Part of the block's name, handled by the parent.
			case "", "optional":
				k := ft.Kind()
				if f.Type.Kind() == reflect.Slice {
					k = reflect.Slice // an attribute that is a list
				}
				attrs = append(attrs, docAttr{
					path: path,
					attr: name,
					name: strings.TrimPrefix(joinSteps(path)+"."+name, "."),
					kind: k,
				})
			case "block":
				if ft.Kind() != reflect.Struct {
					t.Fatalf("%s.%s: block of non-struct type %s", typ.Name(), f.Name, ft)
				}
				step := docStep{typ: name}
				for j := 0; j < ft.NumField(); j++ {
					ln, lk, _ := strings.Cut(ft.Field(j).Tag.Get("hcl"), ",")
					if lk != "label" {
						continue
					}
					if step.label != "" {
						t.Fatalf("block %s has more than one label; extend doc_test.go", name)
					}
					step.label = strings.ToUpper(ln)
				}
				p := append(append([]docStep(nil), path...), step)
				blocks = append(blocks, docBlock{path: p, name: joinSteps(p)})
				walk(ft, p)
			default:
				t.Fatalf("%s.%s: hcl tag kind %q is not understood by doc_test.go", typ.Name(), f.Name, kind)
			}
		}
	}
	walk(reflect.TypeFor[hclFile](), nil)
	if len(blocks) == 0 || len(attrs) == 0 {
		t.Fatal("found no hcl-tagged fields in hclFile")
	}
	return blocks, attrs
}

func (a docAttr) section() string {
	if len(a.path) == 0 {
		return topHeading
	}
	return joinSteps(a.path)
}

// docRow is a table row whose first cell is a backticked name.
type docRow struct {
	line    int
	section string // the heading it is under: a block name, topHeading, or another heading's text
	cells   []string
}

type docHeading struct {
	line int
	name string // the backticked block name, or the plain heading text
	code bool   // name was in backticks
}

type parsedDoc struct {
	headings []docHeading
	rows     []docRow
	spans    []docSpan // every backticked span outside code blocks
}

type docSpan struct {
	line int
	text string // without the backticks
}

var (
	backtickRe = regexp.MustCompile("`([^`]+)`")
	// A row of a key table: "| `name` |".
	keyRowRe = regexp.MustCompile("^\\|\\s*`([^`]+)`\\s*\\|")
	// A heading that is a bare block or key name, missing its backticks.
	plainKeyRe = regexp.MustCompile(`^[a-z_]+(?:\.[a-z_]+)*$`)
	// A backticked span shaped like a block or key name: words joined by
	// dots, or a block type followed by a quoted label.
	refShapeRe = regexp.MustCompile(`^([a-z_]+)(?: "[^"]*"|\.[A-Za-z0-9_-]+)+$`)
)

func parseDoc(t *testing.T) parsedDoc {
	t.Helper()
	f, err := os.Open(docPath)
	if err != nil {
		t.Fatalf("the configuration reference is missing: %v", err)
	}
	defer f.Close()
	var d parsedDoc
	section, fenced := "", false
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		if fenced {
			continue
		}
		for _, m := range backtickRe.FindAllStringSubmatch(line, -1) {
			d.spans = append(d.spans, docSpan{line: n, text: m[1]})
		}
		if h, ok := strings.CutPrefix(line, "## "); ok {
			section = strings.TrimSpace(h)
			m := backtickRe.FindStringSubmatch(section)
			code := m != nil && strings.HasPrefix(section, "`")
			if code {
				section = m[1]
			}
			d.headings = append(d.headings, docHeading{line: n, name: section, code: code})
			continue
		}
		if m := keyRowRe.FindStringSubmatch(line); m != nil {
			d.rows = append(d.rows, docRow{line: n, section: section, cells: splitRow(line)})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if fenced {
		t.Errorf("%s: unterminated code block", docPath)
	}
	return d
}

// splitRow splits a Markdown table row into trimmed cells. A "|" inside
// backticks or escaped as "\|" does not split; the first cell keeps its
// backticks.
func splitRow(line string) []string {
	line = strings.TrimSpace(line)
	line = strings.TrimPrefix(line, "|")
	line = strings.TrimSuffix(line, "|")
	var cells []string
	var cur strings.Builder
	code := false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\\' && i+1 < len(line) && line[i+1] == '|':
			cur.WriteByte('|')
			i++
			continue
		case c == '`':
			code = !code
		case c == '|' && !code:
			cells = append(cells, strings.TrimSpace(cur.String()))
			cur.Reset()
			continue
		}
		cur.WriteByte(c)
	}
	return append(cells, strings.TrimSpace(cur.String()))
}

func TestDocCoversEveryKey(t *testing.T) {
	blocks, attrs := schema(t)
	d := parseDoc(t)

	// Sections: one per block plus the top level, in struct order.
	want := []string{topHeading}
	isSection := map[string]bool{topHeading: true}
	for _, b := range blocks {
		want = append(want, b.name)
		isSection[b.name] = true
	}
	seen := map[string]int{}
	var order []string
	for _, h := range d.headings {
		if isSection[h.name] {
			seen[h.name]++
			order = append(order, h.name)
			if seen[h.name] == 2 {
				t.Errorf("%s:%d: second heading for %q", docPath, h.line, h.name)
			}
		} else if h.code || plainKeyRe.MatchString(h.name) {
			t.Errorf("%s:%d: heading %q names no block of the file (block headings are \"## `type`\" or \"## `type \"LABEL\"`\")", docPath, h.line, h.name)
		}
	}
	for _, s := range want {
		if seen[s] == 0 {
			t.Errorf("%s: no section for %s: add a heading \"## %s\"", docPath, s, headingFor(s))
		}
	}
	if !t.Failed() && !slices.Equal(order, want) {
		t.Errorf("%s: sections are in the order %q; want the order of the file, %q", docPath, order, want)
	}

	// Rows: one per attribute, in its block's section; none for anything else.
	byName := map[string]docAttr{}
	for _, a := range attrs {
		byName[a.name] = a
	}
	found := map[string]docRow{}
	rowLine := map[string]int{}
	for _, r := range d.rows {
		name := strings.Trim(r.cells[0], "`")
		if !isSection[r.section] {
			continue // e.g. the up-imapproxy table
		}
		a, ok := byName[name]
		switch {
		case !ok:
			t.Errorf("%s:%d: row for %q, which is not a key of the file (in section %q)", docPath, r.line, name, r.section)
			continue
		case r.section != a.section():
			t.Errorf("%s:%d: %s is documented under %q; move it to the section %q", docPath, r.line, name, r.section, a.section())
		}
		if prev, dup := rowLine[name]; dup {
			t.Errorf("%s:%d: %s is documented twice (first at line %d)", docPath, r.line, name, prev)
			continue
		}
		rowLine[name] = r.line
		if len(r.cells) != 5 {
			t.Errorf("%s:%d: %s: want 5 cells (Key | Type | Default | Allowed | Meaning), got %d", docPath, r.line, name, len(r.cells))
			continue
		}
		found[name] = r
	}
	for _, a := range attrs {
		if _, ok := rowLine[a.name]; !ok {
			t.Errorf("%s: %s is not documented: add a row \"| `%s` | type | default | allowed | meaning |\" under \"## %s\"",
				docPath, a.name, a.name, headingFor(a.section()))
		}
	}

	// Backticked references anywhere must name real keys and blocks.
	for _, s := range d.spans {
		if msg := badReference(s.text, blocks, attrs); msg != "" {
			t.Errorf("%s:%d: `%s`: %s", docPath, s.line, s.text, msg)
		}
	}

	if t.Failed() {
		return
	}
	for _, a := range attrs {
		checkTypeAndDefault(t, a, found[a.name])
	}
}

func headingFor(section string) string {
	if section == topHeading {
		return section
	}
	return "`" + section + "`"
}

// badReference checks a backticked span shaped like a name that starts with
// a block type, such as `cache.expiration`, `listener "imap"` or
// `listener.imap.address` (the form of error messages). Anything else, such
// as `upstream.tls = "starttls"` or `config.hcl`, is not checked.
func badReference(span string, blocks []docBlock, attrs []docAttr) string {
	m := refShapeRe.FindStringSubmatch(span)
	if m == nil {
		return ""
	}
	isBlock := false
	for _, b := range blocks {
		if len(b.path) == 1 && b.path[0].typ == m[1] {
			isBlock = true
		}
	}
	if !isBlock {
		return ""
	}
	for _, b := range blocks {
		if referenceRe(b.path, "").MatchString(span) {
			return ""
		}
	}
	for _, a := range attrs {
		if referenceRe(a.path, a.attr).MatchString(span) {
			return ""
		}
	}
	return "names no key or block of the file"
}

// referenceRe matches the ways prose may name a block (attr "") or an
// attribute: a labelled block's label may be given in quotes after a space
// (listener "imap") or after a dot (listener.imap).
func referenceRe(path []docStep, attr string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString("^")
	for i, s := range path {
		if i > 0 {
			b.WriteString(`\.`)
		}
		b.WriteString(regexp.QuoteMeta(s.typ))
		if s.label != "" {
			b.WriteString(`(?: "[^"]*"|\.[^.\s"]+)`)
		}
	}
	if attr != "" {
		b.WriteString(`\.` + regexp.QuoteMeta(attr))
	}
	b.WriteString("$")
	return regexp.MustCompile(b.String())
}

// docBase is the smallest valid file: the blocks it needs, keyed by block
// name, with their bodies. Each key is tried by adding it to this file.
var docBase = map[string]string{
	`listener "NAME"`: `address = "127.0.0.1:1143"`,
	`backend "NAME"`:  `address = "127.0.0.1:10143"`,
}

// render returns docBase with "attr = value" added at path; with attr ""
// it returns docBase itself.
func render(path []docStep, attr, value string) string {
	line := ""
	if attr != "" {
		line = attr + " = " + value
	}
	header := func(s docStep) string {
		if s.label == "" {
			return s.typ + " {\n"
		}
		return s.typ + ` "doc-test" {` + "\n"
	}
	inner := line
	for i := len(path) - 1; i >= 1; i-- {
		inner = header(path[i]) + inner + "\n}"
	}
	var b strings.Builder
	placed := len(path) == 0
	if placed {
		b.WriteString(line + "\n")
	}
	names := make([]string, 0, len(docBase))
	for name := range docBase {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		body := docBase[name]
		if len(path) > 0 && path[0].String() == name {
			body += "\n" + inner
			placed = true
		}
		typ, _, _ := strings.Cut(name, " ")
		fmt.Fprintf(&b, "%s \"doc-test\" {\n%s\n}\n", typ, body)
	}
	if !placed {
		b.WriteString(header(path[0]) + inner + "\n}\n")
	}
	return b.String()
}

func parseCfg(src string) (*Config, error) {
	c, err := Parse([]byte(src), "doc-test.hcl")
	if c != nil {
		c.pos = nil
	}
	return c, err
}

var typeOfKind = map[reflect.Kind][]string{
	reflect.Bool:   {"bool"},
	reflect.Int:    {"integer"},
	reflect.Int64:  {"integer"},
	reflect.String: {"string", "duration"},
	reflect.Slice:  {"list of strings"},
}

func checkTypeAndDefault(t *testing.T, a docAttr, r docRow) {
	t.Helper()
	at := fmt.Sprintf("%s:%d: %s", docPath, r.line, a.name)
	typ := strings.Trim(r.cells[1], "` ")
	okTypes := typeOfKind[a.kind]
	if okTypes == nil {
		t.Errorf("%s: Go kind %s is not known to doc_test.go", at, a.kind)
		return
	}
	if !slices.Contains(okTypes, typ) {
		t.Errorf("%s: type %q, want one of %q", at, typ, okTypes)
		return
	}

	base, err := parseCfg(render(nil, "", ""))
	if err != nil {
		t.Fatalf("the minimal file of doc_test.go does not parse: %v", err)
	}

	if a.kind == reflect.String {
		_, err := parseCfg(render(a.path, a.attr, `"bogus-duration"`))
		isDuration := err != nil && strings.Contains(err.Error(), `invalid duration "bogus-duration"`)
		switch {
		case typ == "duration" && !isDuration:
			t.Errorf("%s: documented as a duration, but is not parsed as one", at)
		case typ == "string" && isDuration:
			t.Errorf("%s: documented as a string, but is a duration", at)
		}
	}

	def := r.cells[2]
	if !strings.HasPrefix(def, "`") {
		return // no literal default to prove
	}
	m := backtickRe.FindStringSubmatch(def)
	if m == nil {
		t.Errorf("%s: unbalanced backticks in default %q", at, def)
		return
	}
	got, err := parseCfg(render(a.path, a.attr, m[1]))
	if err != nil {
		t.Errorf("%s: documented default %s does not parse: %v", at, m[1], err)
		return
	}
	if diff := configDiff(reflect.ValueOf(*got), reflect.ValueOf(*base), "Config"); diff != "" {
		t.Errorf("%s: documented default %s is not the default: %s", at, m[1], diff)
	}
}

// configDiff names the first field where a (set) and b (omitted) differ.
func configDiff(a, b reflect.Value, path string) string {
	switch a.Kind() {
	case reflect.Struct:
		for i := 0; i < a.NumField(); i++ {
			if !a.Type().Field(i).IsExported() {
				continue
			}
			if d := configDiff(a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name); d != "" {
				return d
			}
		}
		return ""
	case reflect.Slice:
		if a.Len() != b.Len() {
			return fmt.Sprintf("%s has %d elements when set, %d when omitted", path, a.Len(), b.Len())
		}
		for i := 0; i < a.Len(); i++ {
			if d := configDiff(a.Index(i), b.Index(i), fmt.Sprintf("%s[%d]", path, i)); d != "" {
				return d
			}
		}
		return ""
	}
	if !reflect.DeepEqual(a.Interface(), b.Interface()) {
		return fmt.Sprintf("%s is %v when set, %v when omitted", path, a.Interface(), b.Interface())
	}
	return ""
}

// TestExampleConfig loads config.hcl as the proxy would, then checks the
// commented-out examples in it too: with every line that looks like an
// assignment or a block boundary uncommented, the file must still decode
// with no unknown key and no bad duration.
func TestExampleConfig(t *testing.T) {
	if _, err := Load(exampleHCL); err != nil {
		t.Fatalf("Load(%s): %v", exampleHCL, err)
	}

	src, err := os.ReadFile(exampleHCL)
	if err != nil {
		t.Fatal(err)
	}
	hclLine := regexp.MustCompile(`^(\s*)#\s?(\s*(?:[a-z_]+\s*=\s*\S.*|[a-z_]+(?:\s+"[^"]*")?\s*\{\s*|\}\s*))$`)
	lines := strings.Split(string(src), "\n")
	n := 0
	for i, l := range lines {
		if m := hclLine.FindStringSubmatch(l); m != nil {
			lines[i] = m[1] + m[2]
			n++
		}
	}
	if n == 0 {
		t.Log("config.hcl has no commented-out examples")
	}
	uncommented := []byte(strings.Join(lines, "\n"))
	f, diags := hclsyntax.ParseConfig(uncommented, exampleHCL+" (examples uncommented)", hcl.InitialPos)
	if diags.HasErrors() {
		t.Fatalf("commented-out examples in %s do not parse once uncommented:\n%s", exampleHCL, diags.Error())
	}
	var raw hclFile
	ck := checker{}
	ck.diags(gohcl.DecodeBody(f.Body, nil, &raw))
	defaults().apply(&raw, &ck)
	if err := ck.err(); err != nil {
		t.Errorf("commented-out examples in %s are stale:\n%v", exampleHCL, err)
	}
}
